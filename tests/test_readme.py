"""The README's Python examples run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show the contract in code"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_lists_the_registered_mixers():
    import seqmix

    assert str(seqmix.list_mixers()) in README.read_text()


def test_readme_links_and_images_point_to_files():
    text = README.read_text()
    targets = re.findall(r"\]\(((?!https?://|#)[^)\s]+)\)", text)
    assert targets, "the README should link its plots and tables"
    missing = [t for t in targets if not (README.parent / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
