"""The documentation: the README's links lead somewhere, the site builds with `mkdocs build
--strict` (no broken link, anchor or page), and its reference is generated from the code."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def _gen_reference():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs' default make it (for the headings used here)."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(markdown: Path) -> set[str]:
    text = markdown.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # a "# comment" in a code block is no heading
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def _all_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        ann = field.annotation
        subs = [a for a in (getattr(ann, "__args__", None) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in subs:
            out += _all_fields(sub, path + ".")
    return out


def test_readme_is_a_quickstart_whose_links_all_resolve():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move reference material into docs/"
    head = "\n".join(lines[:6])
    assert "python -m harness.loop" in head and ".ci/run" in head, "the install-and-run and test commands come first"

    broken = []
    links = LINK.findall(text)
    assert links, "the README links into the documentation"
    for target in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL: not ours to check offline
        path, _, anchor = target.partition("#")
        dest = (ROOT / path) if path else README
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(ROOT)} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "README.md links that lead nowhere:\n" + "\n".join(broken)


def test_config_reference_describes_every_field_of_the_config():
    from harness.config import RunConfig

    page = _gen_reference().config_reference()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \|.*\| (.*) \|$", page, flags=re.M)}
    missing = [f for f in _all_fields(RunConfig) if f not in rows]
    assert not missing, f"fields missing from the generated reference: {missing}"
    undescribed = [f for f in _all_fields(RunConfig) if not rows[f].strip()]
    assert not undescribed, (
        f"config fields with no description: {undescribed}. Write a comment next to each field in its "
        f"pydantic model (the line above it, or after it), or give it Field(description=...)")
    # The descriptions are the code's own comments, wherever they stand.
    assert "Critic mix" in rows["finetune.critic_weight"]  # the comment above the field
    assert "calls in flight at once" in rows["endpoint.concurrency"]  # the comment after it


def _mkdocs_available() -> bool:
    return importlib.util.find_spec("mkdocs") is not None and importlib.util.find_spec("material") is not None


@pytest.mark.slow
def test_docs_site_builds_strict_with_the_generated_reference(tmp_path):
    if not _mkdocs_available():
        if os.environ.get("CI"):
            pytest.fail("mkdocs / mkdocs-material are not installed; CI installs the `docs` extra (.ci/run)")
        pytest.skip("mkdocs not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"

    from harness.config import RunConfig

    config_page = (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    assert all(f"<code>{f}</code>" in config_page for f in _all_fields(RunConfig))
    cli_page = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for command in ("harness.loop", "harness.compare", "harness.repair", "harness.jobs", "harness.models"):
        assert f"usage: python -m {command}" in cli_page
    # The committed plots a reader wants are in the site, where the pages show them.
    assert (site / "results" / "real-model" / "accuracy.png").stat().st_size > 0
    assert (site / "results" / "real-model" / "report" / "diversity.png").stat().st_size > 0
    home = (site / "index.html").read_text(encoding="utf-8")
    assert 'src="results/real-model/accuracy.png"' in home
