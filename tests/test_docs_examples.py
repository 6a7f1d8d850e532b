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

def _tiny_sd3_with_t5(directory: Path) -> None:
    """The tiny SD3 pipeline with a tiny T5 as its third text encoder.

    ``fewstep.zoo.tiny`` saves SD3 without T5 (components ``None``), which plain
    ``StableDiffusion3Pipeline.from_pretrained(id)`` refuses; the released checkpoint has one. The
    T5 width is the transformer's ``joint_attention_dim`` (64), as SD3 concatenates the encoders'
    tokens.
    """
    from transformers import T5Config, T5EncoderModel

    from fewstep.zoo import tiny

    pipe = tiny.build_tiny_sd3_pipeline()
    tokenizer = pipe.tokenizer
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=pipe.transformer.config.joint_attention_dim,
                                 d_ff=37, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                 decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)).eval()
    pipe.register_modules(text_encoder_3=t5, tokenizer_3=tokenizer)
    pipe.save_pretrained(directory)


def _tiny(builder: str, **options):
    def build(directory: Path) -> None:
        from fewstep.zoo import tiny

        getattr(tiny, builder)(directory, **options)
    return build


# hub id -> builder of a tiny random-weight pipeline of the same family (loads with the same class)
HUB_MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _tiny("build_tiny_sd_pipeline"),
    "stabilityai/stable-diffusion-xl-base-1.0": _tiny("build_tiny_sdxl_pipeline"),
    "black-forest-labs/FLUX.1-schnell": _tiny("build_tiny_flux_pipeline", use_dynamic_shifting=False),
    "stabilityai/stable-diffusion-3-medium-diffusers": _tiny_sd3_with_t5,
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
    cache = tmp_path_factory.mktemp("hf-hub-cache")

    def serve(repo_id: str) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        if repo.exists():
            return
        snapshot = repo / "snapshots" / _REVISION
        HUB_MODELS[repo_id](snapshot)
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
