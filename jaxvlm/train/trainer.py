"""Supervised fine-tuning: one jit'd gradient step per batch shape, optax AdamW, orbax checkpoints.

`SFTTrainer(model, processing_class, data_collator, train_dataset, args=SFTConfig(...)).train()` mirrors
TRL's surface as Unsloth's notebooks use it. Gradients exist only for the trainable leaves (LoRA `a`/`b`
and modules_to_save, or every float param when no LoRA is present); the frozen base gets neither
gradient buffers nor optimizer state.

Loss: cross entropy in fp32 over the tokens whose label is not -100, labels shifted by one inside the
loss (as transformers does). With gradient accumulation the summed token losses of all micro-batches
are divided by their total token count, as transformers' Trainer does since 4.46, so accumulating 4
batches of 2 equals one batch of 8.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxvlm import lora
from jaxvlm.kernels import lora_matmul, one_device_on
from jaxvlm.kernels.cross_entropy import IGNORE_INDEX, chunked_token_loss_sum, token_loss_sum
from jaxvlm.layers import LayerNorm, RMSNorm, activation_layout, dropout_key
from jaxvlm.paths import path_key
from jaxvlm.sharding import (BATCH_AXES, as_mesh, local_shards, mesh_size, optimizer_shardings, place, place_shards,
                             shard_batch, shard_model)
from jaxvlm.train.data import DataError
from jaxvlm.train.optim import adamw_8bit

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SFTConfig:
    """TRL's SFTConfig fields that apply here; others are accepted, ignored, and named in one warning.

    TRL's `max_length` is taken as `max_seq_length` (TRL's later name for it).
    """
    output_dir: str = "outputs"
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_steps: int = -1
    num_train_epochs: float = 1.0
    learning_rate: float = 2e-4
    logging_steps: int = 1
    optim: str = "adamw_8bit"
    weight_decay: float = 0.01
    lr_scheduler_type: str = "linear"
    seed: int = 3407
    max_seq_length: int | None = None
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    save_steps: int = 0
    save_total_limit: int | None = None
    report_to: str = "none"
    # jaxvlm: the loss runs over equal chunks of at most this many tokens, so the fp32 logits of the
    # whole batch never exist (0: form all logits at once, the reference).
    loss_chunk_size: int = 512
    # jaxvlm: the device mesh (jaxvlm.sharding.make_mesh): "data=2,fsdp=4", a dict, a jax Mesh, or None (one
    # device: none; several: every device on "fsdp"). per_device_train_batch_size is per data x fsdp coordinate.
    mesh: object = None

    def __init__(self, **kwargs):
        if "max_length" in kwargs:
            # TRL renamed max_seq_length to max_length; both are the length records are cut to.
            length = kwargs.pop("max_length")
            if kwargs.setdefault("max_seq_length", length) != length:
                raise ValueError(f"max_length={length} and max_seq_length={kwargs['max_seq_length']}: both name "
                                 f"the sequence length (TRL's and Unsloth's spelling); give one")
        names = {f.name for f in dataclasses.fields(type(self))}
        for f in dataclasses.fields(type(self)):
            setattr(self, f.name, f.default)
        self.ignored = {}
        for key, value in kwargs.items():
            if key in names:
                setattr(self, key, value)
            else:
                self.ignored[key] = value
        if self.ignored:
            warnings.warn(_ignored_message(self.ignored), UserWarning, stacklevel=2)


# What does the job of TRL arguments that have no field here; any other unknown argument is "not used".
_INSTEAD = {
    **dict.fromkeys(("bf16", "fp16", "tf32"),
                    "the compute dtype comes from FastVisionModel.from_pretrained(dtype=...)"),
    **dict.fromkeys(("dataset_text_field", "dataset_kwargs", "remove_unused_columns", "skip_prepare_dataset",
                     "dataset_num_proc"), "the vision data collator prepares the records"),
}


def _ignored_message(ignored: dict) -> str:
    """One line naming each ignored SFTConfig argument, grouped by what to do instead."""
    groups: dict[str, list[str]] = {}
    for key in ignored:
        groups.setdefault(_INSTEAD.get(key, "not used by jaxvlm"), []).append(key)
    return "SFTConfig ignores " + "; ".join(f"{', '.join(keys)} ({why})" for why, keys in groups.items())


# ----------------------------------------------------------------------------------------------
# Loss, trainable split, optimizer.


def split_trainable(model: nnx.Module, is_trainable: Callable[[tuple], bool]):
    """(graphdef, trainable leaves, frozen leaves, rebuild) where rebuild(trainable, frozen) -> model.

    Leaves are those of the model's state pytree, typed weights (LoRA, NF4) opened up, so a LoRA's `a`
    and `b` can be trainable while its base stays frozen. `is_trainable(key_path)` decides.
    """
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    mask = [is_trainable(path) for path, _ in flat]
    trainable = [leaf for (_, leaf), m in zip(flat, mask) if m]
    frozen = [leaf for (_, leaf), m in zip(flat, mask) if not m]
    paths = [path for (path, _), m in zip(flat, mask) if m]

    def rebuild(trainable, frozen):
        it_t, it_f = iter(trainable), iter(frozen)
        leaves = [next(it_t) if m else next(it_f) for m in mask]
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
    return trainable, frozen, rebuild, paths


def default_is_trainable(model: nnx.Module) -> Callable[[tuple], bool]:
    """LoRA factors (and modules_to_save) when the model has adapters, else every param (full fine-tuning)."""
    from jaxvlm.lora import has_lora, trainable_filter
    if has_lora(model):
        return trainable_filter(model)
    return lambda path: True


def decay_mask(model: nnx.Module, paths: Sequence[tuple]) -> list[bool]:
    """Which trainable leaves get weight decay: all but biases and the params of norm layers, as
    transformers' Trainer decides (by module type, so every family's norms are found whatever their names)."""
    norms = {path_key(p) for p, m in nnx.iter_modules(model) if isinstance(m, (RMSNorm, LayerNorm))}

    def decays(path) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        inside_norm = any(".".join(names[:i]) in norms for i in range(1, len(names)))
        return not (inside_norm or "bias" in names)
    return [decays(p) for p in paths]


def lr_schedule(args: SFTConfig, total_steps: int) -> optax.Schedule:
    """transformers' schedules (get_scheduler): the lr used at optimizer step k (k = 0 first). `schedule(k, np)`
    evaluates it with NumPy on the host (the trainer's log: jnp would run it on the device, behind the steps queued
    there)."""
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    lr = args.learning_rate

    def schedule(step, xp=jnp):
        step = xp.asarray(step, xp.float32)
        warm = step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        kind = args.lr_scheduler_type
        if kind == "linear":
            after = xp.maximum(0.0, 1.0 - progress)
        elif kind == "cosine":
            after = xp.maximum(0.0, 0.5 * (1.0 + xp.cos(xp.pi * progress)))
        elif kind in ("constant", "constant_with_warmup"):
            after = xp.ones_like(step)
            if kind == "constant":
                return lr * after
        else:
            raise ValueError(f"lr_scheduler_type={kind!r}: expected linear, cosine, constant or constant_with_warmup")
        return lr * xp.where(step < warmup, warm, after)
    return schedule


_OPTIMIZERS = {
    "adamw_torch": optax.adamw, "adamw_torch_fused": optax.adamw, "adamw": optax.adamw,
    # bitsandbytes' AdamW8bit; "paged" is CUDA unified memory, which has no counterpart here.
    "adamw_8bit": adamw_8bit, "paged_adamw_8bit": adamw_8bit,
    # The first moment in bf16 (what adamw_8bit meant before it kept 8-bit moments), the second in fp32.
    "adamw_bf16": functools.partial(optax.adamw, mu_dtype=jnp.bfloat16),
}


def make_optimizer(args: SFTConfig, total_steps: int, decays: Sequence[bool]) -> optax.GradientTransformation:
    """Clipping, then `args.optim` with `args`' schedule; `decays[i]`: whether leaf i gets weight decay."""
    if args.optim not in _OPTIMIZERS:
        raise ValueError(f"optim={args.optim!r}: expected one of {sorted(_OPTIMIZERS)}")
    return optax.chain(
        optax.clip_by_global_norm(args.max_grad_norm) if args.max_grad_norm else optax.identity(),
        _OPTIMIZERS[args.optim](lr_schedule(args, total_steps), b1=args.adam_beta1, b2=args.adam_beta2,
                                eps=args.adam_epsilon, weight_decay=args.weight_decay, mask=list(decays)),
    )


# ----------------------------------------------------------------------------------------------
# The trainer.


@dataclasses.dataclass
class TrainOutput:
    global_step: int
    training_loss: float
    metrics: dict


class SFTTrainer:
    """Fine-tunes `model` on `train_dataset` (list of records, datasets.Dataset, or a JSONL path)."""

    def __init__(self, model, processing_class=None, data_collator=None, train_dataset=None,
                 args: SFTConfig | None = None, tokenizer=None, is_trainable=None, **kwargs):
        from jaxvlm.train.data import load_records
        self.model = model
        self.args = args or SFTConfig()
        self.processor = processing_class or tokenizer
        if data_collator is None:
            from jaxvlm.train.collator import VisionDataCollator
            data_collator = VisionDataCollator(model, self.processor, max_seq_length=self.args.max_seq_length)
        self.collator = data_collator
        if train_dataset is None:
            raise DataError("train_dataset is required")
        self.dataset = load_records(train_dataset)
        if len(self.dataset) == 0:
            raise DataError("train_dataset is empty")
        self.is_trainable = is_trainable  # None: decided from the model when training starts
        self.log_history: list[dict] = []
        self._compiled_shapes: set = set()
        self.mesh = _mesh(self.args.mesh)

    # -- steps ---------------------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        """Samples per micro-batch over all devices: per_device_train_batch_size x the mesh's data x fsdp size."""
        return self.args.per_device_train_batch_size * (1 if self.mesh is None else mesh_size(self.mesh, BATCH_AXES))

    def _batches_per_epoch(self) -> int:
        return math.ceil(len(self.dataset) / self.global_batch_size)

    def total_steps(self) -> int:
        a = self.args
        if a.max_steps and a.max_steps > 0:
            return a.max_steps
        return max(1, math.ceil(self._batches_per_epoch() * a.num_train_epochs / a.gradient_accumulation_steps))

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.args.seed, epoch]).permutation(len(self.dataset))

    def micro_batch(self, index: int) -> tuple[dict, list[int]]:
        """Micro-batch number `index` of the run (epochs follow each other, each in its own seeded order)."""
        per_epoch, size = self._batches_per_epoch(), self.global_batch_size
        epoch, k = divmod(index, per_epoch)
        ids = self._epoch_order(epoch)[k * size:(k + 1) * size].tolist()
        return self.collator([self.dataset[i] for i in ids], indices=ids), ids

    def _placed_inputs(self, index: int, where=None) -> tuple[dict, list[int], tuple[int, int, int]]:
        """Micro-batch `index` as the step takes it (on the device `where`, a sharding or device, default JAX's; or
        laid out on the mesh), its record ids, and its (trained, attended) token counts, with the records the collator
        had skipped up to it (on_overflow="skip")."""
        batch, ids = self.micro_batch(index)
        inputs = self.model_inputs(batch)
        counts = (*_token_counts(batch), getattr(self.collator, "skipped", 0))
        inputs = jax.device_put(inputs, where) if self.mesh is None else shard_batch(inputs, len(ids), self.mesh)
        return inputs, ids, counts

    def _placed_shards(self, index: int, shards: list[int]) -> tuple[dict, list[int], tuple[int, int, int]]:
        """As `_placed_inputs`, for per-shard batches (`shard_batches`): this host's shards laid out on the mesh,
        the global micro-batch's record ids, and the token counts over every host's shards (each holds its own)."""
        batches, ids = self.shard_batches(index, shards)
        inputs = place_shards(self.shard_inputs(batches), shards, self.mesh)
        trained, attended = _agree(np.sum([_token_counts(b) for b in batches.values()], axis=0), np.sum)
        return inputs, ids, (int(trained), int(attended), getattr(self.collator, "skipped", 0))

    def model_inputs(self, batch: dict) -> dict:
        arrays = {k: v for k, v in batch.items() if k != "labels"}
        inputs = self.model.prepare_inputs(**arrays)
        inputs.pop("rope_deltas", None)
        inputs["labels"] = np.asarray(batch["labels"], np.int32)
        return inputs

    # -- one batch per data-parallel shard -----------------------------------------------------

    def per_shard(self) -> bool:
        """Whether each data x fsdp coordinate gets a micro-batch of its own (`shard_batches`): on a mesh that
        splits the batch, with jaxvlm's collator, for a family whose packed vision arrays pad to one shape
        (`VisionLanguageModel.PER_SHARD_INPUTS`). Then each device runs the vision tower on its own samples' images
        only, and each host encodes only the records its devices train on. Otherwise the global micro-batch is
        collated whole on every host and its packed vision arrays are replicated (the per-sample ones split)."""
        return (self.mesh is not None and mesh_size(self.mesh, BATCH_AXES) > 1 and hasattr(self.collator, "collate")
                and getattr(type(self.model), "PER_SHARD_INPUTS", False))

    def shard_batches(self, index: int, shards: list[int]) -> tuple[dict[int, dict], list[int]]:
        """({shard: its batch} for `shards` (data x fsdp coordinates, row-major), the global micro-batch's record
        ids). Shard k takes the k-th run of per_device_train_batch_size records of micro_batch's order, so the
        samples of a step do not depend on the mesh. The batches are padded to the largest sizes of any shard (on
        any host: `_agree`), so that they stack into one array per input."""
        per_epoch, size, b = self._batches_per_epoch(), self.global_batch_size, self.args.per_device_train_batch_size
        epoch, k = divmod(index, per_epoch)
        ids = self._epoch_order(epoch)[k * size:(k + 1) * size].tolist()
        rows = {}
        for shard in shards:
            part = ids[shard * b:(shard + 1) * b]
            # The last micro-batch of an epoch may be short: its shards are filled with all-padding rows (no loss).
            rows[shard] = self.collator.encode([self.dataset[i] for i in part], indices=part) + [None] * (b - len(part))
        extents = [self.collator.extent(self.collator.collate(r)) for r in rows.values()]
        floor = {name: max(e[name] for e in extents) for name in extents[0]}
        floor = dict(zip(floor, _agree(np.array(list(floor.values())))))
        return {shard: self.collator.collate(r, floor) for shard, r in rows.items()}, ids

    def shard_inputs(self, batches: dict[int, dict]) -> dict[str, np.ndarray]:
        """The model inputs of each shard's batch, padded to one shape (`VisionLanguageModel.input_fill`) and
        stacked on a leading shard axis, in `batches`' order."""
        inputs = {shard: self.model_inputs(batch) for shard, batch in batches.items()}
        first = next(iter(inputs.values()))
        names = sorted(first)
        for shard, x in inputs.items():
            if sorted(x) != names:
                raise ValueError(f"{type(self.model).__name__}: data-parallel shards' inputs differ in their arrays "
                                 f"({names} and {sorted(x)}): the family cannot take per-shard batches")
        ranks = [np.ndim(first[n]) for n in names]
        shapes = np.array([[d for n in names for d in np.shape(x[n])] for x in inputs.values()]).max(axis=0)
        shapes = _agree(shapes)
        out = {}
        for i, name in enumerate(names):
            start = sum(ranks[:i])
            target = tuple(int(d) for d in shapes[start:start + ranks[i]])
            out[name] = np.stack([_pad_input(self.model, name, x, target) for x in inputs.values()])
        return out

    # -- training ------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        from jaxvlm.fast_vision_model import FastVisionModel
        a = self.args
        if not getattr(self.model, "training", False):
            FastVisionModel.for_training(self.model)
        if self.mesh is not None:  # every weight on the devices that hold its slices (jaxvlm.sharding)
            self.model = shard_model(self.model, self.mesh)
        # One device, LoRA factors (and modules_to_save) trained: the widening adapted Linears' bases held as their
        # products' [w | b] operands (jaxvlm.lora.widen), B written into them in place each step.
        started = time.perf_counter()
        widened = (self.mesh is None and self.is_trainable is None and one_device_on(lora_matmul.widen_setting)
                   and lora.widen(self.model, keep=tuple(getattr(self.model, "modules_to_save", ()) or ())))
        if widened:
            logger.info("%d bases widened in %.2f s", widened, time.perf_counter() - started)
        trainable, frozen, rebuild, paths = split_trainable(
            self.model, self.is_trainable or default_is_trainable(self.model))
        # The buffers travel apart from the other frozen leaves: donated to `refresh`, which returns them refilled.
        at = {id(leaf): i for i, leaf in enumerate(frozen)}
        positions = [at[id(buf)] for buf in lora.widened_buffers(self.model)] if widened else []
        wide = [frozen[i] for i in positions]
        for i in positions:
            frozen[i] = None
        if not trainable:
            raise ValueError("the model has nothing to train: add LoRA adapters with get_peft_model first")
        total = self.total_steps()
        tx = make_optimizer(a, total, decay_mask(self.model, paths))
        shardings = None if self.mesh is None else optimizer_shardings(tx, trainable, self.mesh)
        opt_state = jax.jit(tx.init, out_shardings=shardings)(trainable)  # on a mesh: sharded like the params
        step = 0
        if resume_from_checkpoint:
            path = (latest_checkpoint(a.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint)
            trainable, opt_state, step = restore_checkpoint(path, trainable, opt_state)
            logger.info("resumed from %s at step %d", path, step)

        per_shard = self.per_shard()

        def token_losses(model, inputs, key):
            features = {k: v for k, v in inputs.items() if k != "labels"}
            with dropout_key(key):  # LoRA dropout, if the adapters have it
                if not a.loss_chunk_size:
                    return token_loss_sum(model.forward(features), inputs["labels"])
                return chunked_token_loss_sum(model.logits, model.hidden_states(features), inputs["labels"],
                                              a.loss_chunk_size)

        def with_wide(frozen, wide):
            frozen = list(frozen)
            for i, buf in zip(positions, wide):
                frozen[i] = buf
            return frozen

        @functools.partial(jax.jit, donate_argnums=2)
        def refresh(trainable, frozen, wide):
            """The widened buffers with the adapters' current B, in place, by a program of its own: the step then
            reads them as plain inputs (on an H200 the 2B step -0.9% against -0.5% with B written inside it)."""
            return lora.fill_widened(rebuild(trainable, with_wide(frozen, wide)))

        def value_and_grad(trainable, frozen, inputs, key):
            (loss_sum, n_tokens), grads = jax.value_and_grad(
                lambda t: token_losses(rebuild(t, frozen), inputs, key), has_aux=True)(trainable)
            return loss_sum, n_tokens, grads

        @jax.jit
        def grad_step(trainable, frozen, inputs, key):
            if not per_shard:
                return value_and_grad(trainable, frozen, inputs, key)
            # Inputs [shard, ...], the shard axis split over data x fsdp: each device runs its own shards, to its own
            # gradients, summed over the shards once at the end (a gradient of the summed loss would be reduced
            # across devices layer by layer inside the backward scan: hundreds of small collectives a step). The
            # model is rebuilt inside the vmap: NNX modules do not cross transform levels.
            shard_keys = None if key is None else jax.random.split(key, inputs["labels"].shape[0])
            sums, counts, grads = jax.vmap(value_and_grad, in_axes=(None, None, 0, 0), spmd_axis_name=BATCH_AXES)(
                trainable, frozen, inputs, shard_keys)
            return sums.sum(), counts.sum(), jax.tree.map(lambda g: g.sum(0), grads)

        @jax.jit
        def apply_step(trainable, opt_state, grads, loss_sum, n_tokens):
            n = jnp.maximum(n_tokens, 1).astype(jnp.float32)
            grads = jax.tree.map(lambda g: g / n, grads)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            # A step with no trained token has no loss: nan, not 0, so that it cannot pass for a perfect fit.
            loss = jnp.where(n_tokens > 0, loss_sum / n, jnp.nan)
            return optax.apply_updates(trainable, updates), opt_state, loss, grad_norm

        # Micro-batches' gradients and loss sums added in one compiled call (eager adds would dispatch one per leaf).
        accumulate = jax.jit(lambda total, part: jax.tree.map(jnp.add, total, part), donate_argnums=0)
        schedule = lr_schedule(a, total)
        progress = _progress(total, step)
        losses, t_start, tokens_seen = [], time.perf_counter(), 0
        last = {"t": t_start}

        def finish(pending):
            """Log a dispatched step. Called after the next step is dispatched, so that reading its loss
            (which waits for the device) overlaps the next step's host work with device compute."""
            step_no, loss, grad_norm, n_seq_tokens = pending
            loss = float(loss)
            now = time.perf_counter()
            losses.append(loss)
            record = {"step": step_no, "loss": loss, "grad_norm": float(grad_norm),
                      "learning_rate": float(schedule(step_no - 1, np)),
                      "tokens_per_s": n_seq_tokens / (now - last["t"])}
            last["t"] = now
            self.log_history.append(record)
            progress.update(1)
            if a.logging_steps and step_no % a.logging_steps == 0:
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['learning_rate']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
                logger.info(json.dumps(record))

        # Each micro-batch's dropout key is this folded with its index (None when no adapter has dropout).
        dropout_root = jax.random.key(a.seed) if _has_dropout(self.model) else None
        shards = local_shards(self.mesh) if per_shard else None
        # On a mesh, attention's operands are laid out on it (per-shard batches: the vmap places the shard axis).
        layout = functools.partial(activation_layout, self.mesh, None if per_shard else BATCH_AXES, "tensor",
                                   vmapped=per_shard)
        pending = None
        trained_so_far = step  # a resumed run trained before
        # Each micro-batch's inputs are made and sent to the device on a thread one micro-batch ahead, so that
        # collating (the processor's image work) and the host-to-device copy overlap the device's step.
        # One device: where the adapters are (a worker thread does not see the caller's jax.default_device).
        # Per-shard batches of a multi-host run are made on this thread instead: hosts agree on their padding with
        # device collectives (`_agree`), which must be issued in the same order as the steps' on every host.
        where = None if self.mesh is not None else jax.tree.leaves(trainable)[0].sharding
        make = (functools.partial(self._placed_shards, shards=shards) if per_shard
                else functools.partial(self._placed_inputs, where=where))
        in_order = per_shard and jax.process_count() > 1
        prefetch = None if in_order else _Prefetch(make, total * a.gradient_accumulation_steps)
        try:
            while step < total:
                if positions:
                    wide = refresh(trainable, frozen, wide)
                grads = loss_sum = n_tokens = None  # the first micro-batch's, then `accumulate`d
                n_seq_tokens = 0
                record_ids, n_trained = [], 0
                for micro in range(a.gradient_accumulation_steps):
                    index = step * a.gradient_accumulation_steps + micro
                    inputs, ids, counts = make(index) if prefetch is None else prefetch(index)
                    skipped = counts[2]  # the collator may have gone on to the micro-batch prefetched next
                    record_ids += ids
                    n_trained += int(counts[0])
                    self._log_compile(inputs)
                    key = None if dropout_root is None else jax.random.fold_in(dropout_root, index)
                    with layout():  # read while grad_step traces
                        ls, nt, g = grad_step(trainable, with_wide(frozen, wide), inputs, key)
                    if grads is None:
                        grads, loss_sum, n_tokens = g, ls, nt
                    else:
                        grads, loss_sum, n_tokens = accumulate((grads, loss_sum, n_tokens), (g, ls, nt))
                    n_seq_tokens += int(counts[1])
                trained_so_far += n_trained
                seen = (step + 1) * a.gradient_accumulation_steps * self.global_batch_size
                if not trained_so_far and seen >= len(self.dataset):
                    why = (f" ({skipped} records skipped by on_overflow=skip: their image tokens do not fit "
                           f"max_seq_length)" if skipped else "")
                    raise DataError(f"a whole pass over the {len(self.dataset)} records of train_dataset left no token "
                                    f"to train on{why}: raise max_seq_length, shrink the images (resize=), or check "
                                    f"response_part")
                if not n_trained:
                    # A warning, not an error: with small steps a few records whose responses max_seq_length cut
                    # off can fill a step by chance, and the run is still sound; when every step warns, it is not.
                    warnings.warn(f"step {step + 1}: records {record_ids} have no trained token (every label is "
                                  f"-100), so the step has no loss (logged as nan) and only AdamW's momentum and "
                                  f"weight decay move the weights; check that their responses fit max_seq_length "
                                  f"and, with train_on_responses_only, that response_part occurs in them", UserWarning,
                                  stacklevel=2)
                trainable, opt_state, loss, grad_norm = apply_step(trainable, opt_state, grads, loss_sum, n_tokens)
                step += 1
                tokens_seen += n_seq_tokens
                if pending is not None:
                    finish(pending)
                pending = (step, loss, grad_norm, n_seq_tokens)
                if a.save_steps and step % a.save_steps == 0 and step < total:
                    save_checkpoint(a.output_dir, step, trainable, opt_state, a.save_total_limit)
        finally:
            if prefetch is not None:
                prefetch.close()
            trained = rebuild(trainable, with_wide(frozen, wide))
            wide = None  # held by `trained` alone: unwiden frees each buffer once its bases are sliced out of it
            if widened:  # the bases back, in the trained model and in the one given (whose buffers were donated)
                lora.unwiden(trained)
                lora.copy_bases(trained, self.model)
        if pending is not None:
            finish(pending)
        progress.close()
        self.model = trained
        if a.save_steps:
            save_checkpoint(a.output_dir, step, trainable, opt_state, a.save_total_limit)
        if jax.process_index() == 0:  # several hosts: the first writes the run's files (all wrote checkpoints)
            os.makedirs(a.output_dir, exist_ok=True)
            plot_loss(self.log_history, os.path.join(a.output_dir, "loss.png"))
            with open(os.path.join(a.output_dir, "log_history.json"), "w") as f:
                json.dump(self.log_history, f, indent=1)
        runtime = time.perf_counter() - t_start
        trained = [loss for loss in losses if not math.isnan(loss)]
        return TrainOutput(step, float(np.mean(trained)) if trained else float("nan"),
                           {"train_runtime": runtime, "train_tokens_per_second": tokens_seen / max(runtime, 1e-9)})

    def _log_compile(self, inputs: dict) -> None:
        shape = tuple(sorted((k, np.shape(v)) for k, v in inputs.items()))
        if shape not in self._compiled_shapes:
            self._compiled_shapes.add(shape)
            logger.info("compiling the training step for a new batch shape (%d so far): input_ids %s, "
                        "pixel_values %s", len(self._compiled_shapes), np.shape(inputs["input_ids"]),
                        np.shape(inputs.get("pixel_values")))


class _Prefetch:
    """`make(index)` for index 0, 1, ... < `end`, each started on a worker thread when the one before it is asked
    for: asking for `index` returns its result (made now if it was not started) and starts index + 1."""

    def __init__(self, make: Callable, end: int):
        self.make, self.end = make, end
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxvlm-prefetch")
        self.ahead: dict[int, concurrent.futures.Future] = {}

    def __call__(self, index: int):
        current = self.ahead.pop(index, None) or self.pool.submit(self.make, index)
        for stale in self.ahead.values():  # asked out of order (not the trainer's way): drop what was started
            stale.cancel()
        self.ahead = {index + 1: self.pool.submit(self.make, index + 1)} if index + 1 < self.end else {}
        return current.result()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def _token_counts(batch: dict) -> tuple[int, int]:
    """(trained, attended) tokens of a collated batch."""
    return (int((np.asarray(batch["labels"])[:, 1:] != IGNORE_INDEX).sum()),
            int(np.asarray(batch["attention_mask"]).sum()))


def _agree(values: np.ndarray, reduce=np.max) -> np.ndarray:
    """`values` (an int vector) reduced element-wise over every process of a multi-host run (max: the sizes all
    hosts' shards pad to); as they are on one host."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    return reduce(np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64))), axis=0)


def _pad_input(model, name: str, x: dict, shape: tuple[int, ...]) -> np.ndarray:
    """One shard's input `name` padded at the end of its axes to `shape` with the family's `input_fill`."""
    array = np.asarray(x[name])
    if array.shape == shape:
        return array
    fill = model.input_fill(name, x)
    if fill is None:
        raise ValueError(f"{type(model).__name__}.prepare_inputs' {name!r} has shape {array.shape} in one "
                         f"data-parallel shard and {shape} in another, and the family gives it no padding "
                         f"(input_fill)")
    return np.pad(array, [(0, t - n) for n, t in zip(array.shape, shape)], constant_values=fill)


def _mesh(spec):
    """The training mesh: a jax Mesh as given, one from a spec (jaxvlm.sharding.as_mesh), or, with none asked
    for, every device on fsdp when there are several (None on one device: no placement at all)."""
    if spec is None and jax.device_count() == 1:
        return None
    return as_mesh(spec)


def _has_dropout(model) -> bool:
    from jaxvlm.lora import LoRA
    return any(isinstance(v.get_value(), LoRA) and v.get_value().dropout
               for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True,
                disable=jax.process_index() > 0)


# ----------------------------------------------------------------------------------------------
# Checkpoints (orbax) and the loss plot.


def _checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(os.path.abspath(output_dir), f"checkpoint-{step}")


def latest_checkpoint(output_dir: str) -> str:
    steps = [int(d.split("-")[1]) for d in os.listdir(output_dir) if d.startswith("checkpoint-")] \
        if os.path.isdir(output_dir) else []
    if not steps:
        raise FileNotFoundError(f"{output_dir}: no checkpoint-N directory to resume from")
    return _checkpoint_dir(output_dir, max(steps))


def save_checkpoint(output_dir: str, step: int, trainable, opt_state, keep: int | None = None) -> str:
    """Writes the trainable leaves, the optimizer state and the step under output_dir/checkpoint-{step}."""
    import orbax.checkpoint as ocp
    path = _checkpoint_dir(output_dir, step)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"trainable": trainable, "opt_state": opt_state, "step": step}, force=True)
    if keep and jax.process_index() == 0:
        steps = sorted(int(d.split("-")[1]) for d in os.listdir(output_dir) if d.startswith("checkpoint-"))
        for old in steps[:-keep]:
            import shutil
            shutil.rmtree(_checkpoint_dir(output_dir, old), ignore_errors=True)
    return path


def restore_checkpoint(path: str, trainable, opt_state):
    import orbax.checkpoint as ocp
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    target = {"trainable": trainable, "opt_state": opt_state, "step": 0}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
    # Each array where the run keeps it (the current mesh's placement, whatever mesh wrote the checkpoint; orbax
    # leaves a scalar such as Adam's count on one device).
    placed = jax.tree.map(lambda x, t: place(x, t.sharding) if isinstance(t, jax.Array) else x,
                          {"trainable": restored["trainable"], "opt_state": restored["opt_state"]},
                          {"trainable": trainable, "opt_state": opt_state})
    return placed["trainable"], placed["opt_state"], int(restored["step"])


def plot_loss(history: list[dict], path: str) -> None:
    """A loss-curve PNG of the run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
