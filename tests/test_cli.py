"""The command-line tools, end to end on a tiny model: jaxvlm-train -> jaxvlm-export -> jaxvlm-generate."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import random_image, save_tiny_model


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


@pytest.mark.parametrize("tool,options", [("train", ["--data", "--rank", "--load-in-4bit", "--resume"]),
                                          ("generate", ["--image", "--prompt", "--adapter", "--do-sample"]),
                                          ("export", ["--save-method", "--overwrite", "--push-to-hub"])])
def test_help_names_the_options(tool, options):
    out = subprocess.run([sys.executable, "-m", f"jaxvlm.cli.{tool}", "--help"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True).stdout
    assert out.startswith("usage:")
    for option in options:
        assert option in out, option


def test_train_export_generate(model_dir, tmp_path, capsys):
    from jaxvlm.cli import export, generate, train
    data = write_records(tmp_path / "data")
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, "--data", data, "--output", str(out), "--max-steps", "3",
                       "--batch-size", "2", "--grad-accum", "1", "--rank", "4", "--lr", "1e-3",
                       "--train-on-responses-only", "--dtype", "float32"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (out / "loss.png").stat().st_size > 1000
    assert len(json.loads((out / "log_history.json").read_text())) == 3

    merged = tmp_path / "merged"
    assert export.main(["--model", model_dir, "--adapter", str(adapter), "--output", str(merged),
                        "--dtype", "float32"]) == 0
    assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))
    with pytest.raises(FileExistsError):  # a non-empty output is refused without --overwrite
        export.main(["--model", model_dir, "--output", str(merged)])

    image = tmp_path / "data" / "imgs" / "0.png"
    capsys.readouterr()
    assert generate.main(["--model", str(merged), "--image", str(image), "--prompt", "which digit is this",
                          "--max-new-tokens", "4", "--dtype", "float32"]) == 0
    assert generate.main(["--model", str(merged), "--image", str(tmp_path / "missing.png"),
                          "--prompt", "hi"]) == 2
    assert "cannot read image" in capsys.readouterr().err
