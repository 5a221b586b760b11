"""Layering invariants (docs/design.md, "Layers"): which heavy libraries each process imports.

Every check runs in a fresh interpreter (`python -X importtime -c ...`), because the test process
itself has torch loaded long ago; a failure names the import chain that pulled the library in.
The last test keeps code, configs and docs from citing notes that live outside the repository.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "ray")


def _import_chain(importtime: str, module: str) -> str:
    """The chain of imports that first loaded `module`, read off `-X importtime` output (outermost first).

    importtime prints a module after its children, indented two spaces per nesting level, so the
    importer of the line at depth d is the next line at depth d - 1.
    """
    rows = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        field = line.rsplit("|", 1)[1]
        name = field.strip()
        if name == "imported package":
            continue
        rows.append(((len(field) - len(field.lstrip()) - 1) // 2, name))
    for i, (depth, name) in enumerate(rows):
        if name == module:
            chain = [name]
            for later_depth, later in rows[i + 1:]:
                if later_depth == depth - 1:
                    chain.append(later)
                    depth -= 1
                    if depth == 0:
                        break
            if len(chain) == 1:
                return f"{module} (imported at run time, inside a function)"
            return " -> ".join(reversed(chain))
    return f"{module} (chain not found)"


def _run_fresh(code: str, timeout: float = 240.0) -> tuple[dict[str, bool], str]:
    """Run `code` in a fresh interpreter from the repository root; returns which HEAVY modules it loaded
    and the interpreter's importtime report."""
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import json as _json, sys as _sys
        print("LOADED=" + _json.dumps({{m: m in _sys.modules for m in {HEAVY!r}}}))
    """)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"the fresh interpreter failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    loaded = next(line for line in proc.stdout.splitlines() if line.startswith("LOADED="))
    return json.loads(loaded.removeprefix("LOADED=")), proc.stderr


def _assert_not_loaded(code: str, forbidden: tuple[str, ...], must_load: tuple[str, ...] = ()) -> None:
    loaded, importtime = _run_fresh(code)
    pulled = [f"{m}: {_import_chain(importtime, m)}" for m in forbidden if loaded[m]]
    assert not pulled, "forbidden imports:\n  " + "\n  ".join(pulled)
    # The check can fail: the code under test did load what it needs (otherwise it tested nothing).
    assert all(loaded[m] for m in must_load), f"expected {must_load} to be loaded, got {loaded}"


# ---- the ingress and the engine: neither torch nor transformers -------------------------------------------

@pytest.mark.parametrize("module", ["serve_app", "actors.engine", "actors.batch", "stages.params"])
def test_light_modules_import_neither_torch_nor_transformers(module: str) -> None:
    _assert_not_loaded(f"import {module}", ("torch", "transformers"))


@pytest.mark.parametrize("module", ["actors.scheduler", "actors.job_store"])
def test_scheduler_and_job_store_import_neither_torch_nor_ray(module: str) -> None:
    _assert_not_loaded(f"import {module}", ("torch", "transformers", "ray"))


def test_engine_resolves_the_model_and_builds_its_app_without_torch(tmp_path: Path) -> None:
    """What the ingress replica does before it starts any actor: build the app, construct the engine
    (default model path, checkpoint layout, preset, pools, DiT groups, job store) and resolve a request."""
    _assert_not_loaded(f"""
        from actors.config import ServiceConfig
        from actors.engine import StageEngine
        from serve_app import build_app
        from stages.params import GenerationParams

        cfg = ServiceConfig.model_validate({{"job_store": {str(tmp_path / "jobs.sqlite")!r},
                                            "output_dir": {str(tmp_path / "out")!r}}})
        build_app(cfg)
        engine = StageEngine(cfg)
        assert engine.model.name == "wan-tiny-shapes", engine.model.name
        resolved = GenerationParams(prompt="a red circle").resolve(engine.model)
        assert resolved.sampler == "unipc" and resolved.height == engine.model.defaults.height
    """, ("torch", "transformers"), must_load=("ray",))


# ---- the rank processes: torch, never transformers ---------------------------------------------------------

def test_dit_rank_never_imports_transformers() -> None:
    """A DiT rank as its Ray process runs it: construct the actor, start a job, run two steps."""
    _assert_not_loaded("""
        import numpy as np

        import parallel.dit, parallel.attention  # the context-parallel path of multi-rank groups
        from actors.dit_group import DiTRankActor
        from actors.stage_actors import resolve_model_folder
        from models.registry import describe
        from stages.params import GenerationParams

        rank = DiTRankActor(0, 1, "wan-tiny-shapes", "fp32", "cpu")
        model = describe(resolve_model_folder("wan-tiny-shapes"))
        params = GenerationParams(prompt="x", height=32, width=32, num_frames=5, num_inference_steps=2, seed=0)
        resolved = params.resolve(model).model_dump()
        text = {"context": np.zeros((4, 64), dtype=np.float32), "pooled": None, "mask": None}  # the tiny text width
        assert rank.start("j", resolved, text, text) == 2
        assert list(rank.run_steps("j", 2))[-1]["done"]  # a streaming call: early report, then the result
    """, ("transformers",), must_load=("torch",))


def test_vae_rank_never_imports_transformers() -> None:
    """A patch-parallel VAE rank (it wraps the single decode actor): construct it and decode a latent."""
    _assert_not_loaded("""
        import numpy as np

        import parallel.vae_decode  # the strip-parallel path of multi-rank groups
        from actors.vae_group import VAERankActor

        rank = VAERankActor(0, 1, "wan-tiny-shapes", "cpu")
        frames = rank._decoder.frames(np.zeros((16, 2, 4, 4), dtype=np.float32))
        assert frames.shape == (5, 32, 32, 3), frames.shape
    """, ("transformers",), must_load=("torch",))


# ---- the public model API stays lazy -----------------------------------------------------------------------

def test_models_wan_loads_torch_only_when_a_network_is_named() -> None:
    _assert_not_loaded("""
        import models.wan
        assert "WanTransformer" in dir(models.wan) and "WanTransformer" in models.wan.__all__
        models.wan.get_preset("wan2.1-t2v-1.3b")
    """, ("torch", "transformers"))
    _assert_not_loaded("""
        from models.wan import WanVAE
    """, ("transformers",), must_load=("torch",))


# ---- the family core: nothing above models/ names a family -------------------------------------------------

_FAMILY_IMPORT = re.compile(r"^\s*(?:from|import)\s+models\.(?!(?:registry|family|conditioning|denoiser|attention|"
                            r"errors|loading|cache_calibration)\b)(\w+)", re.MULTILINE)


def test_stages_actors_and_the_service_reach_families_only_through_the_registry() -> None:
    """stages/, actors/ and serve_app.py import the family-neutral core of models/ (registry, description,
    conditioning, block protocol, attention seam, cache calibration file), never a family's package: adding a family is adding its
    folder under models/ and a registry line."""
    files = [ROOT / "serve_app.py", *sorted((ROOT / "stages").glob("*.py")), *sorted((ROOT / "actors").glob("*.py"))]
    found = [f"{path.relative_to(ROOT)} imports models.{m}" for path in files
             for m in _FAMILY_IMPORT.findall(path.read_text())]
    assert not found, "\n".join(found)
    # the check can fail: the registry itself does import the families' modules (by name)
    assert _FAMILY_IMPORT.search("from models.wan.family import describe")


_UPWARD_IMPORT = re.compile(r"^\s*(?:from|import)\s+(stages|actors|serve_app|ray)\b", re.MULTILINE)


def test_flexcache_imports_only_downward_and_knows_no_family() -> None:
    """flexcache/ sits beside parallel/: it may use torch and models' family-neutral core, never the stages,
    the actors, the service, Ray or a family's package (strategies work on any family's block protocol)."""
    files = sorted((ROOT / "flexcache").glob("*.py"))
    found = [f"{path.relative_to(ROOT)} imports {m}" for path in files for m in _UPWARD_IMPORT.findall(path.read_text())]
    found += [f"{path.relative_to(ROOT)} imports models.{m}" for path in files
              for m in _FAMILY_IMPORT.findall(path.read_text())]
    assert not found, "\n".join(found)
    assert _UPWARD_IMPORT.search("from stages.runner import BlockRunner")  # the check can fail


def test_the_cache_spec_imports_no_torch() -> None:
    """The ingress validates `cache` with flexcache.spec: it must stay torch-free."""
    _assert_not_loaded("import flexcache.spec", HEAVY, must_load=())


# ---- no citations of files outside the repository ---------------------------------------------------------

# Notes kept outside this repository (the names are assembled so that this file does not cite them).
_OUTSIDE_NOTES = ("ray", "wan", "acceleration", "models-t2i", "models-xdit", "STYLE", "ARCHITECTURE")
_CITATION = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in _OUTSIDE_NOTES) + r")\.md\b"
                       r"|shared[/]reference|\bSTYLE habit")
_SCANNED = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt"}
_SKIPPED_DIRS = {".git", ".venv", "venv", "node_modules", "build", "dist", "__pycache__"}


def _repo_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.endswith(".egg-info")]
        files += [Path(folder) / n for n in names if Path(n).suffix in _SCANNED]
    return sorted(files)


def test_nothing_cites_files_outside_the_repository() -> None:
    """Code, configs and docs state their facts themselves (or point into docs/), never at outside notes;
    every `docs/*.md` they point to exists."""
    files = _repo_files()
    assert any(p.name == "design.md" for p in files), "the scan found no docs/design.md: wrong root?"
    problems = []
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            where = f"{path.relative_to(ROOT)}:{number}"
            if _CITATION.search(line):
                problems.append(f"{where}: cites a file outside the repository: {line.strip()[:120]}")
            for doc in re.findall(r"\bdocs/[\w./-]+\.md\b", line):
                if not (ROOT / doc).is_file():
                    problems.append(f"{where}: points to {doc}, which does not exist")
    assert not problems, "\n".join(problems)
