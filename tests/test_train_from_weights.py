"""Training from public-layout weights: the transformer comes from the file, a wrong version is refused first."""

import pytest
import torch
import yaml
from test_loading import _bundle, _metadata, _original_state, _write  # tiny checkpoints in the public layout
from tiny_gemma import write_tiny_gemma

import trainer.train as train_module
from trainer.cli import main
from trainer.config import resolve
from trainer.models.loading import WeightsError
from trainer.train import train


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    bundle = _bundle("2.3")
    path = tmp_path_factory.mktemp("weights") / "ltx-2.3-tiny.safetensors"
    return bundle, _write(path, _original_state(bundle), _metadata("2.3"))


def _config(tmp_path, checkpoint, target="tiny-ltx-2.3"):
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"target": target, "checkpoint": str(checkpoint)},
        "lora": {"rank": 4},
        "train": {"steps": 2, "gradient_checkpointing": False},
        "data": {"cache_dir": str(tmp_path / "cache"), "synthetic": {"num_samples": 2, "frames": 9, "height": 64,
                                                                     "width": 64}},
    }


def test_training_uses_the_checkpoint_weights(tmp_path, monkeypatch, single_file):
    bundle, path = single_file
    built = []
    real = train_module.build_transformer
    monkeypatch.setattr(train_module, "build_transformer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    train(resolve(_config(tmp_path, path)), progress=False)

    # The frozen base after training is exactly the model the file was written from (in the training dtype).
    source = bundle["transformer"].state_dict()
    base = {k.replace(".base_layer", ""): v.cpu() for k, v in built[0].state_dict().items() if "lora_" not in k}
    assert base.keys() == source.keys()
    assert all(torch.equal(base[k], source[k].to(base[k].dtype)) for k in source)


def test_checkpoint_of_the_other_version_is_refused_before_loading(tmp_path, monkeypatch, single_file):
    _, path = single_file
    monkeypatch.setattr(train_module, "build_transformer", lambda *a, **k: pytest.fail("model was built"))
    with pytest.raises(WeightsError, match=r"an LTX-2.3 checkpoint, but model.target = 'tiny-ltx-2' is LTX-2.0; "
                                           r"set model.target = 'tiny-ltx-2.3'"):
        train(resolve(_config(tmp_path, path, target="tiny-ltx-2")), progress=False)


def test_check_weights_command_on_a_file_and_on_a_config(tmp_path, capsys, single_file):
    _, path = single_file
    assert main(["check-weights", str(path)]) == 0
    report = capsys.readouterr().out
    assert "transformer" in report and "video_vae" in report and "every tensor read" in report

    config = tmp_path / "run.yaml"
    with_text = _config(tmp_path, path)
    with_text["model"]["text_encoder"] = str(write_tiny_gemma(tmp_path / "gemma"))
    config.write_text(yaml.safe_dump(with_text))
    assert main(["check-weights", str(config)]) == 0
    report = capsys.readouterr().out
    assert "transformer" in report and "text encoder  Gemma 3, hidden size" in report

    config.write_text(yaml.safe_dump(_config(tmp_path, path, target="tiny-ltx-2")))
    assert main(["check-weights", str(config)]) == 2
    assert "set model.target = 'tiny-ltx-2.3'" in capsys.readouterr().err
