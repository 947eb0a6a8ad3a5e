"""The command-line tools, end to end on a tiny model: jaxvlm-train -> jaxvlm-export -> jaxvlm-generate."""
import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from jaxvlm.cli import export, generate, train
from jaxvlm.cli.common import run_tool, tool_logging
from tests.conftest import random_image, save_tiny_model

REPO = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_model")
    save_tiny_model(path, "qwen2_vl")
    return str(path)


def write_records(folder, n=4):
    (folder / "imgs").mkdir(parents=True)
    lines = []
    for i in range(n):
        random_image(56, 56, seed=i).save(folder / "imgs" / f"{i}.png")
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"imgs/{i}.png"},
                                         {"type": "text", "text": "which digit is this"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"the digit is {i}"}]}]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "train.jsonl")


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def train_args(model_dir, data, out, *more):
    return ["--model", model_dir, "--data", data, "--output", str(out), "--batch-size", "2", "--grad-accum", "1",
            "--lr", "1e-3", "--dtype", "float32", *more]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("cli_data"))


@pytest.fixture(scope="module")
def trained(model_dir, data, tmp_path_factory):
    """A 3-step jaxvlm-train run under umask 022: (its --output, what it printed)."""
    out = tmp_path_factory.mktemp("cli_run") / "run"
    printed, errors = io.StringIO(), io.StringIO()
    with umask(0o022), contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = train.main(train_args(model_dir, data, out, "--max-steps", "3", "--rank", "4",
                                     "--train-on-responses-only"))
    assert code == 0, errors.getvalue()
    return out, printed.getvalue()


def error_line(err, tool):
    """The message of the one line `jaxvlm-<tool>: error: <message>` that is all of `err`."""
    prefix = f"jaxvlm-{tool}: error: "
    assert err.startswith(prefix) and err.endswith("\n") and err.count("\n") == 1, err
    return err[len(prefix):-1]


def run_cli(tool, *args, without_torch=False):
    """The tool run as a user runs it, in a fresh interpreter: (exit code, stdout, stderr)."""
    if without_torch:  # as on a machine without PyTorch (jaxvlm needs none), where transformers says so
        command = ["-c", f"import sys; sys.modules['torch'] = None; from jaxvlm.cli.{tool} import main; "
                         f"sys.exit(main(sys.argv[1:]))"]
    else:
        command = ["-m", f"jaxvlm.cli.{tool}"]
    done = subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, cwd=REPO)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("tool,options", [("train", ["--data", "--rank", "--load-in-4bit", "--resume", "--overwrite",
                                                     "--debug"]),
                                          ("generate", ["--image", "--prompt", "--adapter", "--do-sample", "--debug"]),
                                          ("export", ["--save-method", "--overwrite", "--push-to-hub", "--debug"])])
def test_help_names_the_options(tool, options):
    out = subprocess.run([sys.executable, "-m", f"jaxvlm.cli.{tool}", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert out.startswith("usage:")
    for option in options:
        assert option in out, option


def test_train_export_generate(model_dir, data, trained, tmp_path, capsys):
    out, printed = trained
    assert "trained 3 steps" in printed
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (out / "loss.png").stat().st_size > 1000
    assert len(json.loads((out / "log_history.json").read_text())) == 3

    merged = tmp_path / "merged"
    assert export.main(["--model", model_dir, "--adapter", str(adapter), "--output", str(merged),
                        "--dtype", "float32"]) == 0
    assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))
    capsys.readouterr()
    assert export.main(["--model", model_dir, "--output", str(merged)]) == 2  # a non-empty output needs --overwrite
    assert "--overwrite" in error_line(capsys.readouterr().err, "export")

    image = os.path.join(os.path.dirname(data), "imgs", "0.png")
    capsys.readouterr()
    assert generate.main(["--model", str(merged), "--image", image, "--prompt", "which digit is this",
                          "--max-new-tokens", "4", "--dtype", "float32"]) == 0
    assert generate.main(["--model", str(merged), "--image", str(tmp_path / "missing.png"),
                          "--prompt", "hi"]) == 2
    assert "cannot read image" in capsys.readouterr().err


# -- user errors: one line on stderr, exit code 2 --------------------------------------------------


def test_a_missing_model_directory_is_one_line_on_stderr(tmp_path):
    missing = tmp_path / "no-such-model"
    code, _, err = run_cli("export", "--model", str(missing), "--output", str(tmp_path / "out"))
    assert code == 2
    assert str(missing) in error_line(err, "export")


def test_a_missing_data_file_is_one_line_on_stderr(model_dir, tmp_path, capsys):
    missing = tmp_path / "no-such.jsonl"
    assert train.main(train_args(model_dir, str(missing), tmp_path / "out")) == 2
    assert str(missing) in error_line(capsys.readouterr().err, "train")


def test_debug_shows_the_traceback_of_a_user_error(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        train.main(train_args(model_dir, str(tmp_path / "no-such.jsonl"), tmp_path / "out", "--debug"))


def test_export_refuses_a_non_empty_output_before_loading_the_model(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export.main(["--model", str(tmp_path / "no-such-model"), "--output", str(out)]) == 2
    assert error_line(capsys.readouterr().err, "export") == f"{out} exists and is not empty: pass --overwrite to " \
                                                            f"write into it"
    assert (out / "notes.txt").read_text() == "mine"


def test_a_bug_keeps_its_traceback():
    def body(args):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        run_tool("jaxvlm-test", body, argparse.Namespace(debug=False))


def test_ctrl_c_exits_130_with_one_line(capsys):
    def body(args):
        raise KeyboardInterrupt
    assert run_tool("jaxvlm-test", body, argparse.Namespace(debug=False)) == 130
    assert capsys.readouterr().err == "jaxvlm-test: error: interrupted\n"


# -- logs ------------------------------------------------------------------------------------------


def test_logs_keep_jaxvlm_info_and_other_libraries_warnings_only(capsys):
    with tool_logging(debug=False):
        logging.getLogger("jaxvlm.train.trainer").info("step 1")
        logging.getLogger("jax._src.xla_bridge").info("backend chatter")
        logging.getLogger("orbax.checkpoint").info("checkpoint chatter")
        logging.getLogger("orbax.checkpoint").warning("disk almost full")
    err = capsys.readouterr().err
    assert "step 1" in err and "disk almost full" in err
    assert "chatter" not in err


def test_debug_logs_every_library_info(capsys):
    with tool_logging(debug=True):
        logging.getLogger("jax._src.xla_bridge").info("backend chatter")
    assert "backend chatter" in capsys.readouterr().err


def test_a_log_line_is_not_glued_to_a_progress_bar(capsys):
    from tqdm import tqdm
    with tool_logging(debug=False):
        bar = tqdm(total=2, desc="training", file=sys.stderr)
        logging.getLogger("jaxvlm.train.trainer").info("step 1")
        bar.close()
    line = next(line for line in capsys.readouterr().err.split("\n") if "step 1" in line)
    assert "training" not in line.rsplit("\r", 1)[-1], line


def test_generate_prints_no_library_chatter(model_dir, tmp_path):
    image = tmp_path / "0.png"
    random_image(56, 56).save(image)
    code, out, err = run_cli("generate", "--model", model_dir, "--image", str(image), "--prompt", "hi",
                             "--max-new-tokens", "2", "--dtype", "float32", without_torch=True)
    assert code == 0, err
    assert out.strip()
    assert "PyTorch was not found" not in err
    assert not re.search(r"^\S+ \S+ (absl|jax|orbax)\b", err, re.MULTILINE), err


# -- an --output that holds an earlier run -----------------------------------------------------------


def test_train_refuses_to_replace_an_earlier_adapter(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    assert train.main(train_args(model_dir, data, out)) == 2
    assert "pass --overwrite" in error_line(capsys.readouterr().err, "train")
    assert (out / "adapter" / "adapter_config.json").read_text() == "{}"


def test_train_refuses_an_earlier_runs_checkpoints(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    assert train.main(train_args(model_dir, data, out)) == 2
    assert error_line(capsys.readouterr().err, "train") == (
        f"{out} has checkpoints from an earlier run: pass --resume to continue it or --overwrite to start again")


def test_train_resume_without_a_checkpoint_is_an_error(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    assert train.main(train_args(model_dir, data, out, "--resume")) == 2
    assert "no checkpoint-N directory" in error_line(capsys.readouterr().err, "train")


def test_train_resume_and_overwrite_contradict(model_dir, data, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.parse_args(train_args(model_dir, data, tmp_path, "--resume", "--overwrite"))
    assert e.value.code == 2


def test_train_overwrite_starts_again_and_keeps_the_users_files(model_dir, data, trained, tmp_path):
    earlier, _ = trained
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-9").mkdir()  # the earlier run's: a later --resume must not pick it up
    assert train.main(train_args(model_dir, data, out, "--max-steps", "1", "--rank", "2", "--overwrite")) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert len(json.loads((out / "log_history.json").read_text())) == 1
    assert not (out / "checkpoint-9").exists()
    assert (out / "notes.txt").read_text() == "mine"


# -- output folders ----------------------------------------------------------------------------------


def test_output_folders_follow_the_umask(model_dir, trained, tmp_path):
    out, _ = trained
    merged = tmp_path / "merged"
    with umask(0o022):
        assert export.main(["--model", model_dir, "--adapter", str(out / "adapter"), "--output", str(merged),
                            "--dtype", "float32"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    library = ("a folder the library saved into is 0700: jaxvlm.export.atomic_dir renames a tempfile.mkdtemp "
               "folder into place")
    for folder in (out / "adapter", merged):
        mode = stat.S_IMODE(folder.stat().st_mode)
        assert mode == 0o755, f"{folder}: {oct(mode)}; {library}"


# -- videos ---------------------------------------------------------------------------------------------


def test_train_and_generate_with_a_video_file(model_dir, tmp_path, capsys):
    """A JSONL record with a relative .mp4 path trains; jaxvlm-generate --video answers about the file."""
    from tests.test_video_processing import write_mp4
    rng = np.random.default_rng(0)
    (tmp_path / "clips").mkdir()
    write_mp4(tmp_path / "clips" / "a.mp4", rng.integers(0, 256, (4, 56, 84, 3), dtype="uint8"), fps=2)
    record = {"messages": [
        {"role": "user", "content": [{"type": "video", "video": "clips/a.mp4"}, {"type": "text", "text": "what moves"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "nothing"}]}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    out = tmp_path / "out"
    assert train.main(train_args(model_dir, str(tmp_path / "train.jsonl"), out, "--max-steps", "2",
                                 "--batch-size", "1")) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    code, stdout, err = run_cli("generate", "--model", model_dir, "--adapter", str(out / "adapter"), "--video",
                                str(tmp_path / "clips" / "a.mp4"), "--prompt", "what moves", "--max-new-tokens", "3",
                                "--dtype", "float32", without_torch=True)
    assert code == 0, err
    assert stdout.strip()
    code, _, err = run_cli("generate", "--model", model_dir, "--video", str(tmp_path / "missing.mp4"), "--prompt", "x")
    assert code == 2 and f"cannot read video {tmp_path / 'missing.mp4'}: no such file" in err


def check_train_generate_export(model_dir, model_type, tmp_path, capsys):
    """A family's tiny model through jaxvlm-train (2 LoRA steps on responses only), jaxvlm-generate with the adapter,
    jaxvlm-export (merged) and jaxvlm-generate on the merged model, which must print what base + adapter did."""
    from jaxvlm.cli import export, generate, train
    data = write_records(tmp_path / "data")
    out = tmp_path / "run"
    assert train.main(train_args(model_dir, data, out, "--max-steps", "2", "--rank", "4",
                                 "--train-on-responses-only")) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert len(json.loads((out / "log_history.json").read_text())) == 2
    image = str(tmp_path / "data" / "imgs" / "0.png")
    ask = ["--image", image, "--prompt", "which digit is this", "--max-new-tokens", "6", "--dtype", "float32"]
    assert generate.main(["--model", model_dir, "--adapter", str(adapter), *ask]) == 0
    with_adapter = capsys.readouterr().out.strip()
    assert with_adapter
    merged = tmp_path / "merged"
    assert export.main(["--model", model_dir, "--adapter", str(adapter), "--output", str(merged),
                        "--dtype", "float32"]) == 0
    assert json.loads((merged / "config.json").read_text())["model_type"] == model_type
    capsys.readouterr()
    assert generate.main(["--model", str(merged), *ask]) == 0
    assert capsys.readouterr().out.strip() == with_adapter, "the merged model should generate what base + adapter do"
