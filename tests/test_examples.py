"""The shipped examples run and say what they claim."""
import os
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="needs dataset-fashion-mnist")
def test_convert_own_backbone_example(capsys, monkeypatch):
    """Trained dense weights convert exactly, routers fine-tune with the experts untouched."""
    monkeypatch.setattr(sys, "argv", ["convert_own_backbone.py", "--steps", "40"])
    runpy.run_path(str(EXAMPLES / "convert_own_backbone.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "blocks.0.0" in out and "blocks.1.0" in out  # both bottleneck convs converted (hidden scope)
    assert "max |MoE - dense|: 0.0" in out
    ratio = float(out.split("executed MACs with 2 of 4 experts: ")[1].split("%")[0])
    assert ratio < 100
    assert "expert weights unchanged: True" in out
    assert "after fine-tuning routers and experts" in out


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="needs dataset-fashion-mnist")
def test_robustify_and_evaluate_example(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["robustify_and_evaluate.py", str(tmp_path / "run")])
    runpy.run_path(str(EXAMPLES / "robustify_and_evaluate.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "training moe cifar_resnet_small with advmoe" in out and "MoE-adaptive" in out
    assert (tmp_path / "run" / "model.moe").is_file()
