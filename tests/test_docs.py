"""The docs stay true: the configuration reference matches the config models, every relative link resolves, and the
README stays a five-minute read that starts with the commands the Makefile and CI run. No Ray, no model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines import config_reference
from pipelines.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _fenced_out(text: str) -> str:
    """The text without its fenced code blocks (a ``[x](y)`` inside one is code, not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _links(text: str) -> list[str]:
    """The targets of a Markdown file's links, code blocks and inline code left out."""
    return LINK.findall(re.sub(r"`[^`\n]*`", "", _fenced_out(text)))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#{1,6} (.+)$", _fenced_out(path.read_text(encoding="utf-8")), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_configuration_reference_is_generated_from_the_config_models():
    committed = config_reference.DOC.read_text(encoding="utf-8")
    assert committed == config_reference.render(), (
        "docs/configuration.md is stale: a config key, default or description changed; regenerate it with "
        f"`{config_reference.FIX}`")


def _keys(model, prefix):
    for name, field in model.model_fields.items():
        yield f"{prefix}.{name}", field
        for sub in config_reference._models(field.annotation):
            yield from _keys(sub, f"{prefix}.{name}")


def test_every_key_and_description_is_in_the_reference():
    text = config_reference.render()
    sections = [(n, f) for n, f in Config.model_fields.items() if config_reference._models(f.annotation)]
    assert {n for n, _ in sections} >= {"storage", "corpus", "embed", "index", "query_log", "retrieve", "rerank",
                                        "train", "train_biencoder", "eval", "maintenance", "ray", "report", "lock"}
    for name, field in sections:
        for key, sub in _keys(config_reference._models(field.annotation)[0], name):
            assert f"| `{key}` |" in text, f"{key} missing from the configuration reference"
            if sub.description:
                assert config_reference._cell(sub.description) in text, f"{key}'s description missing"


def test_check_names_the_fix_when_the_file_is_stale(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text("old\n", encoding="utf-8")
    assert config_reference.main(["--check"], path=page) == 1
    assert f"`{config_reference.FIX}`" in capsys.readouterr().err
    assert page.read_text(encoding="utf-8") == "old\n"  # --check writes nothing
    assert config_reference.main([], path=page) == 0
    assert config_reference.main(["--check"], path=page) == 0


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_an_existing_file(page):
    broken = []
    for target in _links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.name}: broken links: {', '.join(broken)}"


def test_readme_is_short_and_starts_with_the_demo_and_test_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; move detail to docs/ and link it"
    assert lines[0].startswith("# ")
    first_block = lines[lines.index("```bash") + 1:]
    first_block = first_block[:first_block.index("```")]
    commands = [line.split("#")[0].strip() for line in first_block]
    assert commands == ["make demo", "make test"], "the README must open with `make demo` and `make test`"
    said = re.search(r"\((python -m pytest tests[^)]*)\)", first_block[1])
    assert said, "the README says what `make test` runs"

    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert recipe and said.group(1).removeprefix("python ") in recipe.group(1), \
        "`make test` runs the suite the README names, with the same options"
    assert re.search(r"^demo:.*\n\t.*examples/demo\.py", makefile, flags=re.M), "`make demo` runs the demo"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert commands[1] in [line.strip() for line in ci], ".ci/run runs the README's test command"
