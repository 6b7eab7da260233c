"""The ltx-lora command: export and inspect, and user errors reported in one line with exit code 2."""

import yaml
from safetensors.torch import load_file

from trainer.cli import main


def _trained_run(tmp_path):
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"target": "tiny-ltx-2"},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"steps": 2, "checkpoint_every": 2, "gradient_checkpointing": False},
        "data": {"cache_dir": str(tmp_path / "cache"), "synthetic": {"num_samples": 2, "frames": 9, "height": 64,
                                                                     "width": 64}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    return tmp_path / "run"


def test_export_checkpoint_and_inspect(tmp_path, capsys):
    run = _trained_run(tmp_path)
    out = tmp_path / "exported" / "from_checkpoint.safetensors"
    assert main(["export", str(run / "checkpoints" / "step-00000002"), str(out)]) == 0
    # The checkpoint export equals the run's own final export (same step, same scale folding).
    final = load_file(run / "lora.safetensors")
    exported = load_file(out)
    assert exported.keys() == final.keys() and all((exported[k] == final[k]).all() for k in final)

    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "rank:     4" in report and "tiny-ltx-2 (LTX version 2.0)" in report


def test_user_errors_exit_2_with_one_message(tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    assert main(["inspect", str(broken)]) == 2
    assert "broken.safetensors is not a safetensors file" in capsys.readouterr().err

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"output_dir": "x", "model": {"target": "tiny-ltx-2"}, "data": {"cache_dir": "c"},
                                      "lora": {"rank": 0}}))
    assert main(["train", str(config)]) == 2
    assert "lora.rank = 0: Input should be greater than 0" in capsys.readouterr().err

    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
