"""The shipped examples run and say what they claim."""
import runpy
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_convert_own_backbone_example(capsys):
    runpy.run_path(str(EXAMPLES / "convert_own_backbone.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "blocks.0.0" in out and "blocks.1.3" in out  # both block convs converted (paper scope)
    assert "max |MoE - dense|: 0.0" in out
    ratio = float(out.split("executed MACs with 2 of 4 experts: ")[1].split("%")[0])
    assert ratio < 100
