"""A batched generation engine for many requests at once (`fast_inference`): continuous batching over a slot KV cache.

`generate` runs one batch from prefill to the last EOS: prompts are padded to the longest, and a finished row keeps
its place until every row is done. The engine instead holds `max_num_seqs` slots, each a row of one KV cache of
`max_length` token slots, and fills a slot again as soon as its request ends:

    engine = Engine(model, max_num_seqs=64, max_length=1024, eos_token_id=..., pad_token_id=...)
    requests = [engine.submit(max_new_tokens=128, **processor(text=..., images=..., return_tensors="np"))
                for ...]
    engine.run()                       # or: for token in requests[0]: ... (a stream; it drives the engine)
    requests[0].token_ids              # the generated ids, EOS included when it came

A request's prompt is prefilled alone (batch 1, its length rounded up to a multiple of 64, left-padded as `generate`
pads), into a one-row cache that is then written into its slot's row. Decoding runs all slots together, `steps` tokens
per call of one jit'd program (a scan of decode steps with sampling on the device), each slot at its own cache slot
and text position (the families' `decode` takes a per-row `index`). Between calls the host hands out the tokens,
retires finished requests and admits waiting ones. A slot that finishes inside a call computes a few more tokens that
are dropped.

The model's arrays are inputs of the jit'd programs, not constants: LoRA stays unmerged (`linear` applies it), and
`set_model` swaps in another adapter of the same shapes without compiling again (Unsloth's `lora_request`).
One device; every request's prompt and new tokens must fit `max_length`. A family whose cache has parts sized by the
prompt (Llama 3.2 Vision's cross-attention keys and values, one block per image's tiles) says so in
`INFO.prompt_sized_cache`: the slot cache then grows along those axes to the largest prompt so far, and smaller
prompts' rows are zero-padded (absent entries to that family). Another family's such prompt is refused.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.generate import SamplingConfig, _jit_model, _prefill, loop_model, sample
from jaxvlm.layers import unrolled_layers

_PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this: a few prefill programs, not one per length
PREFILL_MAX = 16  # the most requests prefilled in one batch


@dataclasses.dataclass
class Request:
    """One request: its prompt ids, what it has generated so far (`token_ids`), and whether it is done
    (`finish_reason`: "stop" at an EOS, which `token_ids` then ends with, or "length"). Iterating over it yields its
    new token ids as they come, running the engine while it waits."""
    request_id: int
    prompt_token_ids: np.ndarray
    max_new_tokens: int
    inputs: dict | None  # the processor's outputs, until the request is prefilled
    engine: "Engine" = dataclasses.field(repr=False)
    token_ids: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self):
        seen = 0
        while True:
            while seen < len(self.token_ids):
                seen += 1
                yield self.token_ids[seen - 1]
            if self.finished:
                return
            self.engine.step()


def _batch_axes(model, length: int):
    """Per cache leaf, the axis that runs over the batch (the one whose size follows the batch size)."""
    one, two = (jax.eval_shape(lambda b=b: model.init_cache(b, length)) for b in (1, 2))
    return jax.tree.map(lambda a, b: next(i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y), one, two)


def _insert(cache, rows, slots, axes: tuple):
    """`cache` with row i of `rows` (a cache of the same layout, len(slots) rows) written at batch position
    `slots[i]`; `axes`: each leaf's batch axis, in leaf order."""
    leaves, treedef = jax.tree.flatten(cache)
    out = []
    for c, r, a in zip(leaves, jax.tree.leaves(rows), axes):
        for i in range(slots.shape[0]):
            c = jax.lax.dynamic_update_slice_in_dim(c, jax.lax.slice_in_dim(r, i, i + 1, axis=a).astype(c.dtype),
                                                    slots[i], a)
        out.append(c)
    return treedef.unflatten(out)


_insert_jit = jax.jit(_insert, static_argnums=3, donate_argnums=0)


def token_axes(model_cls) -> dict[str, int]:
    """The family's processor outputs that run along the prompt's tokens, and their token axis: what left-padding a
    prompt pads."""
    return {"input_ids": 1, "attention_mask": 1, "token_type_ids": 1, "mm_token_type_ids": 1, **{
        name: axes.index("seq") + 1 for name, axes in model_cls.INFO.sample_arrays if "seq" in axes}}


def _pad_to(a: jax.Array, shape) -> jax.Array:
    """`a` zero-padded at the end of each axis to `shape` (itself where it has that shape)."""
    if tuple(shape) == a.shape:
        return a
    return jnp.pad(a, [(0, n - m) for n, m in zip(shape, a.shape)])


@_jit_model(static_argnames=("steps", "sampling"), donate_argnums=(2,))
def _decode_steps(model, cache, tokens, positions, index, key_mask, rng, *, steps, sampling):
    """`steps` decode steps of every slot: feeds `tokens [slots]` at cache slots `index [slots]` and text positions
    `positions [slots]`, samples, feeds the samples, ... Returns (the sampled ids `[slots, steps]`, cache, rng)."""
    rebuilt = loop_model(model)

    def body(carry, step):
        tokens, cache, rng = carry
        model = rebuilt()
        with unrolled_layers():
            h, cache = model.decode(tokens, positions + step, cache, key_mask, index + step)
        rng, key = jax.random.split(rng)
        tokens = sample(model.logits(h[:, 0]).astype(jnp.float32), key, sampling)
        return (tokens, cache, rng), tokens

    (_, cache, rng), out = jax.lax.scan(body, (tokens, cache, rng), jnp.arange(steps, dtype=jnp.int32))
    return out.T, cache, rng


class Engine:
    """Continuous batching over `max_num_seqs` slots of a `max_length`-token KV cache (see the module's doc).

    `sampling`: a `generate.SamplingConfig` for every request (greedy by default); `steps`: decode steps per call
    of the device program (more: fewer host round trips, more tokens computed past a slot's end)."""

    def __init__(self, model, *, max_num_seqs: int = 64, max_length: int = 2048, eos_token_id=None,
                 pad_token_id: int | None = None, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 steps: int = 8):
        if max_num_seqs < 1 or max_length < 2 or steps < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs}, max_length={max_length}, steps={steps}: expected "
                             f"max_num_seqs >= 1, max_length >= 2, steps >= 1")
        self.set_model(model)
        self.slots, self.length, self.steps, self.sampling = max_num_seqs, max_length, steps, sampling
        self.eos = set(np.atleast_1d(np.asarray(eos_token_id if eos_token_id is not None else [], np.int64)).tolist())
        self.pad = int(pad_token_id if pad_token_id is not None else min(self.eos, default=0))
        self._token_axes = token_axes(type(model))
        self._axes = tuple(jax.tree.leaves(_batch_axes(model, max_length)))
        self.cache = jax.jit(lambda: model.init_cache(max_num_seqs, max_length))()
        self.key_mask = np.zeros((max_num_seqs, max_length), np.int32)
        self._key_mask_on_device = None  # key_mask's device copy, sent again only after key_mask changed
        self.index = np.full(max_num_seqs, max_length, np.int32)  # an idle slot writes past the end: dropped
        self.positions = np.zeros(max_num_seqs, np.int32)
        self.tokens = np.full(max_num_seqs, self.pad, np.int32)
        self.running: list[Request | None] = [None] * max_num_seqs
        self.waiting: collections.deque[Request] = collections.deque()
        self._ids = itertools.count()
        self._rng = jax.random.key(seed)
        # Calls of the device programs so far: prefills, the requests they held, decode calls.
        self.stats = collections.Counter()

    def set_model(self, model) -> None:
        """Generate with `model` from now on: the same family and shapes (another LoRA adapter, or merged weights of
        the same dtype) reuse the compiled programs. Requests under way continue with the new weights."""
        graphdef, state = nnx.split(model)  # once, not per call of the jit'd programs
        if hasattr(self, "model") and graphdef != self._graphdef:
            raise ValueError("set_model: the new model's parameters are not laid out as the engine's model's "
                             "(another family, another LoRA rank or targets?): build a new Engine for it")
        self.model, self._graphdef, self._state = model, graphdef, state

    def submit(self, *, max_new_tokens: int = 128, **processor_outputs) -> Request:
        """Queues one request: what the processor returns for one prompt (input_ids `[1, n]` or `[n]`, its
        attention_mask, pixel_values, image_grid_thw, ...). Returns its Request (see `Request`)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive int")
        if "input_ids" not in processor_outputs:
            raise ValueError("submit: expected the processor's outputs for one prompt, with input_ids")
        ids = np.asarray(processor_outputs["input_ids"]).astype(np.int32)
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected one prompt, [1, n] or [n] with n >= 1, got shape {ids.shape}")
        mask = np.asarray(processor_outputs.get("attention_mask", np.ones_like(ids))).astype(np.int32).reshape(ids.shape)
        prompt = ids[0][mask[0] > 0]
        bucket = -(-prompt.size // _PROMPT_BUCKET) * _PROMPT_BUCKET
        if bucket + max_new_tokens > self.length:
            raise ValueError(f"a prompt of {prompt.size} tokens (its prefill bucket {bucket}) + max_new_tokens="
                             f"{max_new_tokens} does not fit the engine's max_length={self.length}")
        # The prompt left-padded to its bucket, with every processor output that runs along its tokens.
        keep = np.flatnonzero(mask[0] > 0)
        inputs = dict(processor_outputs, input_ids=ids, attention_mask=mask)
        for name, axis in self._token_axes.items():
            if inputs.get(name) is not None:
                value = np.take(np.asarray(inputs[name]), keep, axis=axis)
                widths = [(0, 0)] * value.ndim
                widths[axis] = (bucket - keep.size, 0)
                inputs[name] = np.pad(value, widths, constant_values=self.pad if name == "input_ids" else 0)
        request = Request(next(self._ids), prompt, int(max_new_tokens), inputs, self)
        self.waiting.append(request)
        return request

    def generate(self, requests: list[dict], max_new_tokens: int = 128) -> list[Request]:
        """Submits every request (processor outputs, one prompt each) and runs them to the end, in order."""
        out = [self.submit(max_new_tokens=max_new_tokens, **r) for r in requests]
        self.run()
        return out

    def run(self, on_step=None) -> None:
        """Steps until no request waits or runs; calls `on_step()` after each step (a progress bar's update)."""
        while self.waiting or any(r is not None for r in self.running):
            self.step()
            if on_step is not None:
                on_step()

    def step(self) -> None:
        """Admits waiting requests into free slots (prefilled together where they can be), then one call of `steps`
        decode steps."""
        free = [slot for slot, r in enumerate(self.running) if r is None]
        if free and self.waiting:
            self._admit([(slot, self.waiting.popleft()) for slot in free[:len(self.waiting)]])
        if not any(r is not None for r in self.running):
            return
        self._rng, rng = jax.random.split(self._rng)
        self.stats["decode_calls"] += 1
        if self._key_mask_on_device is None:
            self._key_mask_on_device = jnp.asarray(self.key_mask)
        out, self.cache, _ = _decode_steps.pure(self._graphdef, self._state, self.cache, self.tokens, self.positions,
                                                self.index, self._key_mask_on_device, rng, steps=self.steps,
                                                sampling=self.sampling)
        out = np.asarray(out)
        self.tokens = out[:, -1].copy()
        self.index = np.minimum(self.index + self.steps, self.length).astype(np.int32)
        self.positions += self.steps
        for slot, request in enumerate(self.running):
            if request is not None:
                for token in out[slot]:
                    if self._emit(request, int(token)):
                        self._retire(slot)
                        break

    def _admit(self, admitted: list) -> None:
        """Prefills `admitted` [(slot, request)]: requests of one prompt bucket together, in groups of a power of two
        up to PREFILL_MAX (a few batch sizes, so a few compiled programs); the first tokens read back once for all."""
        by_bucket = collections.defaultdict(list)
        for slot, request in admitted:
            by_bucket[request.inputs["input_ids"].shape[1]].append((slot, request))
        parts, firsts = [], []
        for group in by_bucket.values():
            while group:
                size = min(PREFILL_MAX, 1 << (len(group).bit_length() - 1))
                part, group = group[:size], group[size:]
                inputs = self._batched([r.inputs for _, r in part])
                for piece, piece_inputs in ([(part, inputs)] if inputs is not None else
                                            [([one], one[1].inputs) for one in part]):
                    firsts.append(self._prefill(piece, piece_inputs))
                    parts += piece
        for (slot, request), first in zip(parts, np.asarray(jnp.concatenate(firsts)).tolist()):
            self.tokens[slot] = first
            self.running[slot] = request
            if self._emit(request, first):
                self._retire(slot)

    def _batched(self, inputs: list[dict]) -> dict | None:
        """One batch of several requests' processor outputs: the prompt-axis arrays (one bucket wide) stacked, the
        others (pixel rows, image grids and sizes: one row per image or patch) concatenated in order. None where that
        does not make a batch (a family with per-sample arrays, shapes that do not concatenate)."""
        if len(inputs) == 1:
            return inputs[0]
        if type(self.model).INFO.sample_arrays:
            return None
        out = {}
        for name in set().union(*inputs):
            values = [np.asarray(i[name]) for i in inputs if i.get(name) is not None]
            if name in self._token_axes and len(values) != len(inputs):
                return None
            try:
                out[name] = np.concatenate(values)
            except ValueError:
                return None
        return out

    def _prefill(self, part: list, inputs: dict) -> jax.Array:
        """Prefills the requests of `part` [(slot, request)] from their batched processor outputs `inputs`, writes
        their cache rows into their slots and the slots' host state; returns their first tokens (on the device)."""
        for _, request in part:
            request.inputs = None
        k, bucket = inputs["input_ids"].shape
        self.stats.update(prefills=1, prefilled_requests=k)
        prepared = self.model.prepare_inputs(**inputs)
        key_mask = np.concatenate([inputs["attention_mask"], np.ones((k, self.length - bucket), np.int32)], axis=1)
        empty = self.model.init_cache(k, self.length)
        logits, rows = _prefill.pure(self._graphdef, self._state, jax.tree.map(jnp.asarray, prepared), empty,
                                     jnp.asarray(key_mask), mesh=None)
        want = [tuple(k if i == a else n for i, n in enumerate(leaf.shape))
                for leaf, a in zip(jax.tree.leaves(self.cache), self._axes)]
        if [leaf.shape for leaf in jax.tree.leaves(rows)] != want:
            if not type(self.model).INFO.prompt_sized_cache:
                raise NotImplementedError(f"{type(self.model).__name__}: its generation cache changes shape with the "
                                          f"prompt, which the engine's slot cache cannot hold; use generate() for "
                                          f"this request")
            rows = self._fit(rows)
        slots = [slot for slot, _ in part]
        self.cache = _insert_jit(self.cache, rows, jnp.asarray(slots, jnp.int32), self._axes)
        self.key_mask[slots] = key_mask
        self._key_mask_on_device = None
        self.index[slots] = bucket
        self.positions[slots] = self.model.next_positions(prepared)
        self._rng, key = jax.random.split(self._rng)
        return sample(logits, key, self.sampling)

    def _fit(self, rows):
        """A prompt's cache rows and the slot cache brought to one shape along the axes the prompt sizes (a family's
        `INFO.prompt_sized_cache`): the smaller side padded with zeros at the end, which the family reads as absent
        entries. The slot cache grows only when a prompt needs more (its decode program then compiles again)."""
        grown, fitted = [], []
        for c, r, a in zip(jax.tree.leaves(self.cache), jax.tree.leaves(rows), self._axes):
            size = [n if i == a else max(n, r.shape[i]) for i, n in enumerate(c.shape)]
            grown.append(_pad_to(c, size))
            fitted.append(_pad_to(r, [r.shape[a] if i == a else n for i, n in enumerate(size)]))
        treedef = jax.tree.structure(self.cache)
        self.cache = treedef.unflatten(grown)
        return treedef.unflatten(fitted)

    def _emit(self, request: Request, token: int) -> bool:
        """Hands `token` to the request; True when the request is then done."""
        request.token_ids.append(token)
        if token in self.eos:
            request.finish_reason = "stop"
        elif len(request.token_ids) >= request.max_new_tokens:
            request.finish_reason = "length"
        return request.finished

    def _retire(self, slot: int) -> None:
        self.running[slot] = None
        self.key_mask[slot] = 0
        self._key_mask_on_device = None
        self.index[slot] = self.length


# -- vLLM's call, as Unsloth's `model.fast_generate` hands it on ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """vLLM's sampling parameters that the engine implements, with vLLM's names and defaults: `temperature` 0 is
    greedy, `top_k` -1 (or 0) is off, `max_tokens` the new tokens per request, `stop_token_ids` stop besides the
    tokenizer's EOS, `seed` the draws' seed."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: tuple = ()


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    finish_reason: str


@dataclasses.dataclass
class RequestOutput:
    """What vLLM's `LLM.generate` returns per prompt: `outputs[0].text` is the answer."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    outputs: list
    finished: bool = True


def _processor_outputs(processor, prompt) -> tuple[str | None, dict]:
    """(the prompt's text, the processor's outputs) for one of vLLM's prompt forms: a string, a dict with "prompt"
    and optionally "multi_modal_data" ({"image": an image or a list}), or processor outputs (with input_ids)."""
    if isinstance(prompt, dict) and "input_ids" in prompt:
        return None, prompt
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    if not isinstance(prompt, dict) or "prompt" not in prompt:
        raise ValueError(f"fast_generate: a prompt is a string, a dict with 'prompt' (and 'multi_modal_data'), or "
                         f"the processor's outputs with 'input_ids'; got {type(prompt).__name__}")
    data = dict(prompt.get("multi_modal_data") or {})
    unknown = set(data) - {"image"}
    if unknown:
        raise ValueError(f"fast_generate: multi_modal_data keys {sorted(unknown)} are not supported; expected 'image'")
    images = data.get("image")
    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    out = processor(text=[prompt["prompt"]], images=[list(images)] if images else None, return_tensors="np")
    return prompt["prompt"], dict(out)


def fast_generate(model, processor, prompts, sampling_params=None, *, lora_request=None, max_num_seqs: int = 64,
                  max_length: int | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
    """vLLM's `LLM.generate(prompts, sampling_params)` on the engine: every prompt (see `_processor_outputs`) as one
    request, run with continuous batching over `max_num_seqs` slots; one `RequestOutput` per prompt, in order.
    `sampling_params`: a `SamplingParams` or vLLM's (read by attribute name); None: vLLM's defaults. `lora_request`:
    a model with another adapter (get_peft_model / load_adapter) of this model's base, or a PEFT adapter directory,
    used for this call. `max_length`: the slot cache's tokens per request (default the model's max_seq_length)."""
    from tqdm.auto import tqdm

    p = sampling_params if sampling_params is not None else SamplingParams()
    temperature = float(getattr(p, "temperature", 1.0))
    top_k = int(getattr(p, "top_k", -1) or 0)
    sampling = SamplingConfig(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                              top_k=max(top_k, 0), top_p=float(getattr(p, "top_p", 1.0)),
                              min_p=float(getattr(p, "min_p", 0.0)))
    max_tokens = int(getattr(p, "max_tokens", 16) or 16)
    seed = getattr(p, "seed", None)
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if isinstance(lora_request, str):
        lora_request = model.load_adapter(lora_request)
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = [tokenizer.eos_token_id, *(getattr(p, "stop_token_ids", None) or ())]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    length = max_length or getattr(model, "max_seq_length", None) or 2048
    engine = Engine(lora_request or model, max_num_seqs=max_num_seqs, max_length=length, sampling=sampling,
                    eos_token_id=[e for e in eos if e is not None], pad_token_id=pad,
                    seed=0 if seed is None else int(seed))
    texts, requests = [], []
    for prompt in prompts:
        text, inputs = _processor_outputs(processor, prompt)
        texts.append(text)
        requests.append(engine.submit(max_new_tokens=max_tokens, **inputs))
    with tqdm(total=len(requests), desc="fast_generate", unit="request", disable=not use_tqdm) as bar:
        engine.run(on_step=lambda: bar.update(sum(r.finished for r in requests) - bar.n))
    return [RequestOutput(str(r.request_id), text, r.prompt_token_ids.tolist(),
                          [CompletionOutput(0, tokenizer.decode(r.token_ids, skip_special_tokens=True), r.token_ids,
                                            r.finish_reason)])
            for text, r in zip(texts, requests)]
