"""Every ```python example in README.md and docs/**/*.md runs, exactly as written.

Per page, the blocks run in order in one namespace, in a temporary working directory, on the CPU
with one torch thread. A hub id that an example names (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``,
...) resolves to a tiny random-weight pipeline of the same family (``fewstep.zoo.tiny``), served
through a temporary offline Hugging Face cache (``HF_HUB_CACHE`` + ``HF_HUB_OFFLINE=1``, laid out as
the hub client writes it), so what a user types is what runs. Non-Python blocks (```bash, ```text,
```yaml) are not run; every fenced block must name its language.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)

# hub id -> (fewstep.zoo.tiny builder, the family's pipeline); the ids the docs use
HUB_MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "build_tiny_sd_pipeline",
    "stabilityai/stable-diffusion-xl-base-1.0": "build_tiny_sdxl_pipeline",
    "black-forest-labs/FLUX.1-schnell": "build_tiny_flux_pipeline",
    "stabilityai/stable-diffusion-3-medium-diffusers": "build_tiny_sd3_pipeline",
}
_REVISION = "0" * 40  # the snapshot's commit hash; refs/main names it, as after a real download


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """The page's ```python blocks as (line number, dedented source), in order."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        if m.group("lang") in ("python", "py"):
            line = text.count("\n", 0, m.start()) + 2
            blocks.append((line, textwrap.dedent(m.group("body"))))
    return blocks


def _id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


EXAMPLE_PAGES = [p for p in PAGES if python_blocks(p)]


def test_fences_are_labelled():
    """Every fenced block says its language, so no Python example escapes this test unlabelled."""
    bare = [f"{_id(p)}:{p.read_text(encoding='utf-8').count(chr(10), 0, m.start()) + 1}"
            for p in PAGES for m in FENCE.finditer(p.read_text(encoding="utf-8")) if not m.group("lang")]
    assert not bare, f"fenced blocks without a language (use python, bash, text or yaml): {bare}"


def test_results_tables_resolve():
    """Every ``<!-- results-table: FILE N -->`` of the guides names a table that exists (the site
    build fails on one that does not; this says so without mkdocs installed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    found = 0
    for page in PAGES:
        for m in hooks.DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            assert hooks.results_table(m["path"], int(m["index"])).startswith("|"), (_id(page), m[0])
            found += 1
    assert found, "no results-table markers found: the pattern no longer matches the guides"


def test_source_paths_exist():
    """Files of the package that the docs name (``fewstep/samplers/fold.py``) exist: moved modules show up here."""
    missing = sorted({f"{_id(page)}: {path}" for page in PAGES
                      for path in re.findall(r"\bfewstep/[\w/]+\.py\b", page.read_text(encoding="utf-8"))
                      if not (ROOT / path).is_file()})
    assert not missing, f"the docs name files that do not exist: {missing}"


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache folder; ``serve(id)`` builds the tiny pipeline for ``id`` into it once."""
    from fewstep.zoo import tiny

    cache = tmp_path_factory.mktemp("hf-hub-cache")

    def serve(repo_id: str) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        if repo.exists():
            return
        snapshot = repo / "snapshots" / _REVISION
        getattr(tiny, HUB_MODELS[repo_id])(snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(_REVISION)

    serve.cache = cache
    return serve


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """Point the hub client (and diffusers' copies of its settings) at the tiny cache, offline."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache.cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache.cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    # modules that copied the setting at import time
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("diffusers", "huggingface_hub", "transformers") and \
                getattr(module, "HF_HUB_OFFLINE", None) is False:
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    return hub_cache


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=_id)
def test_examples_run(page, offline_hub, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    text = page.read_text(encoding="utf-8")
    for repo_id in HUB_MODELS:
        if repo_id in text:
            offline_hub(repo_id)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "fewstep-cache"))  # references: not the user's cache
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace = {"__name__": "__docs_example__"}
    try:
        for line, source in blocks:
            code = compile(source, f"{_id(page)}:{line}", "exec")
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
    finally:
        torch.set_num_threads(threads)
