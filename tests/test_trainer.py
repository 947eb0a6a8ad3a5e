"""The trainer's per-step losses equal a transformers + torch AdamW reference; resume continues the curve."""
import unittest.mock
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxvlm.lora import widen
from jaxvlm.train import VisionDataCollator
from jaxvlm.train.optim import Quantized
from jaxvlm.train.trainer import SFTConfig, SFTTrainer, make_optimizer, restore_checkpoint, save_checkpoint
from tests.conftest import random_image
from tests.test_qwen2_vl_parity import load


# The trainer's own mechanics (resume, dropout, 8-bit Adam, logging, errors) do not depend on the family: one
# family's tiny model runs them (the loss-parity tests run every family).
ONE_FAMILY = pytest.mark.parametrize("tiny", ["qwen2_vl"], indirect=True)


def records(n=8):
    return [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": random_image(56, 56, seed=i)},
                                     {"type": "text", "text": "which digit is this"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"the digit is {i % 10}"}]}]} for i in range(n)]


def make_trainer(path, steps, output_dir, is_trainable=lambda p: True, **config):
    """A trainer over 8 image records; full fine-tuning unless is_trainable is None (then LoRA's split)."""
    model, processor = load(path)
    collator = VisionDataCollator(model, processor, train_on_responses_only=True,
                                  instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n")
    args = SFTConfig(**{"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": steps,
                        "learning_rate": 5e-3, "warmup_steps": 2, "weight_decay": 0.01, "optim": "adamw_torch",
                        "output_dir": str(output_dir), "seed": 0, **config})
    return SFTTrainer(model, processor, collator, records(), args=args, is_trainable=is_trainable)


def train_and_compare_with_peft(trainer, peft_model, steps, rtol=1e-4):
    """Trains `trainer` for its steps and asserts that its losses equal `torch_reference_losses` of `peft_model`
    (transformers + PEFT from the same init, on the same batches) and fall; returns our losses."""
    trainer.train()
    ours = np.array([r["loss"] for r in trainer.log_history])
    ref = torch_reference_losses(peft_model, trainer, steps)
    print("relative loss differences", np.abs(ours - ref) / ref)
    np.testing.assert_allclose(ours, ref, rtol=rtol)
    assert ours[-1] < ours[0], "the loss should fall"
    return ours


def torch_reference_losses(hf_model, trainer, steps):
    """The same batches through transformers with torch AdamW, HF's linear warmup schedule and clipping."""
    from transformers import get_linear_schedule_with_warmup
    a = trainer.args
    params = [(n, p) for n, p in hf_model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if not ("bias" in n or "norm" in n or "ln_q" in n)]
    no_decay = [p for n, p in params if "bias" in n or "norm" in n or "ln_q" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.learning_rate, eps=a.adam_epsilon)
    sched = get_linear_schedule_with_warmup(opt, a.warmup_steps, steps)
    losses = []
    hf_model.train()
    for step in range(steps):
        micro = [trainer.micro_batch(step * a.gradient_accumulation_steps + i)[0]
                 for i in range(a.gradient_accumulation_steps)]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        for b in micro:
            tensors = {k: torch.from_numpy(np.asarray(v, np.int64 if np.asarray(v).dtype.kind == "i" else None))
                       for k, v in b.items() if k not in ("labels", "n_pad_patches")}
            pad = b.get("n_pad_patches", 0)
            if pad:
                tensors["pixel_values"] = tensors["pixel_values"][:-pad]
            logits = hf_model(**tensors).logits[:, :-1].float()
            labels = torch.from_numpy(np.asarray(b["labels"][:, 1:])).long()
            loss_sum = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                         ignore_index=-100, reduction="sum")
            (loss_sum / n_tokens).backward()
            total += loss_sum.item()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], a.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total / n_tokens)
    return np.array(losses)


def test_full_finetuning_losses_match_torch_for_10_steps(tiny, tmp_path):
    family, path, _ = tiny
    from tests.tiny import build_hf_model
    trainer = make_trainer(path, 10, tmp_path)
    trainer.train()
    ours = np.array([r["loss"] for r in trainer.log_history])
    ref = torch_reference_losses(build_hf_model(family), trainer, 10)
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    assert ours[-1] < ours[0] - 0.5, "the loss should fall over 10 steps at this learning rate"


def test_lora_losses_match_transformers_and_peft_for_10_steps(tiny, tmp_path):
    """The same LoRA init (our adapter loaded into PEFT), data and AdamW: the same per-step losses."""
    lora_losses_match_peft(tiny, tmp_path)


@ONE_FAMILY
def test_lora_losses_match_peft_with_activations_differentiated_by_autodiff(tiny, tmp_path, monkeypatch):
    """JAXVLM_ACTIVATION_BACKWARD=autodiff (the activations' formulas differentiated, where the default forms each
    backward from its input alone inside the rematerialized layer scans): PEFT's per-step losses too."""
    from jaxvlm import layers
    monkeypatch.setattr(layers, "activation_backward", "autodiff")
    lora_losses_match_peft(tiny, tmp_path)


def lora_losses_match_peft(tiny, tmp_path):
    from peft import PeftModel
    from jaxvlm import FastVisionModel
    from tests.tiny import build_hf_model
    family, path, _ = tiny
    trainer = make_trainer(path, 10, tmp_path / "out", is_trainable=None)
    trainer.model = FastVisionModel.get_peft_model(trainer.model, r=8, lora_alpha=16, random_state=0)
    trainer.model.save_pretrained(str(tmp_path / "init"))
    peft_model = PeftModel.from_pretrained(build_hf_model(family), str(tmp_path / "init"), is_trainable=True)
    given = trainer.model
    before = {p: np.asarray(w.base) for p, w in lora_weights(given).items()}
    widened = []
    with unittest.mock.patch("jaxvlm.lora.widen", lambda *a, **k: widened.append(widen(*a, **k)) or widened[-1]):
        trainer.train()
    ours = np.array([r["loss"] for r in trainer.log_history])
    ref = torch_reference_losses(peft_model, trainer, 10)
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    assert ours[-1] < ours[0] - 0.3, "the loss should fall over 10 steps at this learning rate"
    # The widening Linears' bases were [w | b] buffers while training (lora.widen); both the trained model and the
    # one given hold their plain bases again, unchanged.
    assert widened and widened[0] > 0, widened
    for model in (given, trainer.model):
        after = lora_weights(model)
        assert after.keys() == before.keys()
        for p, w in after.items():
            assert isinstance(w.base, jax.Array), (p, type(w.base))
            np.testing.assert_array_equal(np.asarray(w.base), before[p], err_msg=p)


def lora_weights(model) -> dict:
    from flax import nnx

    from jaxvlm.lora import LoRA
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if isinstance(v.get_value(), LoRA)}


@ONE_FAMILY
def test_resume_from_a_checkpoint_continues_the_same_losses(tiny, tmp_path):
    family, path, _ = tiny
    full = make_trainer(path, 6, tmp_path / "full")
    full.train()
    part = make_trainer(path, 3, tmp_path / "part", save_steps=3)
    part.train()
    assert (tmp_path / "part" / "checkpoint-3").is_dir()
    resumed = make_trainer(path, 6, tmp_path / "part")
    resumed.train(resume_from_checkpoint=True)
    np.testing.assert_allclose([r["loss"] for r in resumed.log_history],
                               [r["loss"] for r in full.log_history[3:]], rtol=1e-5)


@ONE_FAMILY
def test_outputs_a_loss_plot_and_log(tiny, tmp_path):
    family, path, _ = tiny
    trainer = make_trainer(path, 2, tmp_path)
    result = trainer.train()
    assert result.global_step == 2 and (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "log_history.json").exists()


@ONE_FAMILY
def test_empty_dataset_is_refused(tiny, tmp_path):
    from jaxvlm.train import DataError
    family, path, _ = tiny
    model, processor = load(path)
    with pytest.raises(DataError, match="empty"):
        SFTTrainer(model, processor, VisionDataCollator(model, processor), [], args=SFTConfig(max_steps=1))


@ONE_FAMILY
def test_lora_dropout_changes_the_steps_and_is_reproducible(tiny, tmp_path):
    """With lora_dropout the step losses differ from the undropped run, are the same for the same seed,
    and the loss still falls."""
    from jaxvlm import FastVisionModel
    family, path, _ = tiny

    def run(dropout, name):
        trainer = make_trainer(path, 4, tmp_path / name, is_trainable=None)
        trainer.model = FastVisionModel.get_peft_model(trainer.model, r=8, lora_alpha=16, random_state=0,
                                                       lora_dropout=dropout)
        trainer.train()
        return np.array([r["loss"] for r in trainer.log_history])

    plain, dropped, again = run(0.0, "plain"), run(0.3, "a"), run(0.3, "b")
    assert plain[0] == pytest.approx(dropped[0], rel=1e-5)  # B = 0 at the start: dropout changes nothing yet
    assert not np.allclose(plain[1:], dropped[1:], rtol=1e-4)
    np.testing.assert_allclose(dropped, again, rtol=1e-6)
    assert dropped[-1] < dropped[0]


@ONE_FAMILY
def test_adamw_8bit_trains_close_to_fp32_adamw(tiny, tmp_path):
    """optim="adamw_8bit" (the default) follows fp32 AdamW's loss curve: measured within 2.7e-4 relative
    over 10 steps for both families (a bf16 first moment, optim="adamw_bf16": 1.2e-3)."""
    family, path, _ = tiny
    eight_bit = make_trainer(path, 10, tmp_path / "8bit", optim="adamw_8bit")
    eight_bit.train()
    fp32 = make_trainer(path, 10, tmp_path / "fp32")
    fp32.train()
    losses = np.array([r["loss"] for r in eight_bit.log_history])
    np.testing.assert_allclose(losses, [r["loss"] for r in fp32.log_history], rtol=1e-3)
    assert losses[-1] < losses[0] - 0.5, "the loss should fall over 10 steps at this learning rate"


def test_8bit_optimizer_state_survives_a_checkpoint(tmp_path):
    params = [jnp.arange(8192, dtype=jnp.float32).reshape(64, 128) / 8192, jnp.ones(64)]
    tx = make_optimizer(SFTConfig(optim="adamw_8bit"), 10, [True, False])
    state = tx.init(params)
    _, state = tx.update(params, state, params)
    save_checkpoint(str(tmp_path), 1, params, state)
    _, restored, step = restore_checkpoint(str(tmp_path / "checkpoint-1"), params, tx.init(params))
    assert step == 1
    for leaf, back in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert back.dtype == leaf.dtype
        np.testing.assert_array_equal(back, leaf)
    assert isinstance(restored[1][0].mu[0], Quantized) and restored[1][0].mu[0].codes.dtype == jnp.uint8


@ONE_FAMILY
def test_a_pass_over_data_that_is_all_skipped_is_an_error(tiny, tmp_path):
    """on_overflow='skip' that skips every record must not "train" on padding: an error once nothing is left."""
    from jaxvlm.train import DataError
    family, path, _ = tiny
    trainer = make_trainer(path, 5, tmp_path)
    # 10 tokens end inside the system turn, before any record's image tokens.
    trainer.collator = VisionDataCollator(trainer.model, trainer.processor, max_seq_length=10, on_overflow="skip")
    with pytest.raises(DataError, match=r"a whole pass over the 8 records of train_dataset left no token to train on "
                                        r"\(8 records skipped by on_overflow=skip"):
        trainer.train()


@ONE_FAMILY
def test_a_step_with_no_trained_token_warns_and_logs_nan(tiny, tmp_path):
    """A response_part that never occurs leaves every label -100: each step says so, and its loss is nan."""
    family, path, _ = tiny
    trainer = make_trainer(path, 1, tmp_path)  # half a pass over the 8 records
    trainer.collator = VisionDataCollator(trainer.model, trainer.processor, train_on_responses_only=True,
                                          instruction_part="<|im_start|>user\n",
                                          response_part="<|im_start|>nobody\n")
    with pytest.warns(UserWarning, match=r"step \d: records \[\d+, \d+, \d+, \d+\] have no trained token") as caught:
        result = trainer.train()
    assert sum("have no trained token" in str(w.message) for w in caught) == 1
    assert all(np.isnan(r["loss"]) for r in trainer.log_history) and np.isnan(result.training_loss)


def test_unused_trl_arguments_warn_once_naming_each_and_what_to_do_instead():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = SFTConfig(bf16=True, fp16=False, dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True},
                           remove_unused_columns=False, packing=False, learning_rate=1e-4)
    [warning] = caught
    assert warning.category is UserWarning and warning.filename == __file__
    message = str(warning.message)
    assert "bf16, fp16 (the compute dtype comes from FastVisionModel.from_pretrained(dtype=...))" in message
    assert ("dataset_text_field, dataset_kwargs, remove_unused_columns (the vision data collator prepares the "
            "records)") in message
    assert "packing (not used by jaxvlm)" in message
    assert set(config.ignored) == {"bf16", "fp16", "dataset_text_field", "dataset_kwargs", "remove_unused_columns",
                                   "packing"}
    assert config.learning_rate == 1e-4


def test_trls_max_length_is_max_seq_length():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SFTConfig(max_length=2048).max_seq_length == 2048
        assert SFTConfig(max_length=2048, max_seq_length=2048).max_seq_length == 2048
        assert SFTConfig(learning_rate=1e-4).ignored == {}
    with pytest.raises(ValueError, match="max_length=1024 and max_seq_length=2048"):
        SFTConfig(max_length=1024, max_seq_length=2048)


@ONE_FAMILY
@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_the_loop_sends_nothing_to_the_device_between_its_compiled_steps(tiny, tmp_path, scheduler):
    """The loop's device work is its two compiled programs (gradient, update) and the prefetched inputs: no eager op
    behind them. The logged learning rate is computed on the host (with jnp it queued behind the next step, and
    reading it made the host wait for that step before dispatching the one after: ~8 ms of idle GPU in the 0.18 s
    H200 step) and the micro-batches add up in one compiled call. Host-to-device transfers other than explicit ones
    raise; the logged rates are transformers' schedule's."""
    from transformers import get_scheduler
    family, path, _ = tiny
    trainer = make_trainer(path, 4, tmp_path, lr_scheduler_type=scheduler)  # 2 micro-batches a step
    with jax.transfer_guard_host_to_device("disallow"):
        trainer.train()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=trainer.args.learning_rate)
    sched = get_scheduler(scheduler, opt, num_warmup_steps=2, num_training_steps=4)
    want = []
    for _ in range(4):
        want.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    np.testing.assert_allclose([r["learning_rate"] for r in trainer.log_history], want, rtol=1e-6)
    assert np.isfinite([r["loss"] for r in trainer.log_history]).all()


@ONE_FAMILY
def test_a_training_step_uses_no_deprecated_optax_function(tiny, tmp_path):
    family, path, _ = tiny
    trainer = make_trainer(path, 1, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [str(w.message) for w in caught if "optax" in str(w.message)]


def test_prefetch_makes_the_next_micro_batch_on_a_thread_while_this_one_is_used():
    import threading

    from jaxvlm.train.trainer import _Prefetch
    started = {}
    release, began_1 = threading.Event(), threading.Event()

    def make(i):
        started[i] = threading.current_thread().name
        if i == 1:
            began_1.set()
            release.wait(5)  # micro-batch 1 is still being made while the caller works on 0
        if i == 3:
            raise ValueError("record 3 is broken")
        return i * 10

    fetch = _Prefetch(make, end=4)
    try:
        assert fetch(0) == 0
        assert began_1.wait(5) and started[1].startswith("jaxvlm-prefetch")  # started before it was asked for
        release.set()
        assert fetch(1) == 10 and fetch(2) == 20
        assert set(fetch.ahead) == {3}  # started ahead; nothing past `end` will be
        with pytest.raises(ValueError, match="record 3"):  # the worker's error reaches the caller
            fetch(3)
    finally:
        fetch.close()
