"""The README's Python examples run as written, in order, in one namespace."""

import importlib.util
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for index, block in enumerate(blocks):
        if "from transformers import" in block and importlib.util.find_spec("transformers") is None:
            continue  # the "Hugging Face models" example needs the hf extra
        exec(compile(block, f"README python block {index}", "exec"), namespace)  # noqa: S102
