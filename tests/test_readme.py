"""The README's Python API example runs as printed (the diffusers one needs a GPU and a model download;
tests/test_diffusers_wan.py covers the processor)."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_python_api_example_runs(one_torch_thread, capsys):
    (example,) = [block for block in python_blocks() if "bsa_attention(" in block]
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102  (our own README)
    assert namespace["out"].shape == namespace["q"].shape
    assert namespace["kept"].shape == (1, 2, 32, 32) and not bool(namespace["kept"].all())
    assert "BSASelection(" in capsys.readouterr().out
