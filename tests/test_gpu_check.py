"""The offline GPU node tooling, without a GPU: wheelhouse selection, the private install, the no-CUDA exit and
the report writer (scripts/wheelhouse.py, scripts/gpu_check.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


wh = _load("wheelhouse")
gc = _load("gpu_check")

LINUX_310 = wh.target_environment("3.10", "manylinux2014_x86_64", "cp")


def _graph(*items: tuple[str, str, list[str]]) -> dict:
    return {wh.canonicalize_name(n): wh.Resolved(wh.canonicalize_name(n), v, [Requirement(r) for r in reqs])
            for n, v, reqs in items}  # fmt: skip


# A resolution of the kind pip reports for the project: torch with its CUDA wheels, hub shared by several.
RESOLVED = _graph(
    ("torch", "2.9.0", ["filelock", "sympy>=1.13", "nvidia-cublas-cu12==12.8.4.1; platform_system == 'Linux'",
                        "triton==3.5.0; platform_system == 'Linux'"]),
    ("nvidia-cublas-cu12", "12.8.4.1", []), ("triton", "3.5.0", []), ("sympy", "1.14.0", ["mpmath"]),
    ("mpmath", "1.3.0", []), ("filelock", "3.20.0", []),
    ("transformers", "4.57.1", ["huggingface-hub<1.0,>=0.34.0", "numpy>=1.17", "tokenizers<=0.23.0,>=0.22.0",
                                "safetensors>=0.4.3", "regex!=2019.12.17"]),
    ("huggingface-hub", "0.36.2", ["filelock", "fsspec>=2023.5.0", "tqdm>=4.42.1", "hf-xet<2.0.0,>=1.1.3; "
                                   "platform_machine == 'x86_64'"]),
    ("hf-xet", "1.8.0", []), ("fsspec", "2025.9.0", []), ("tqdm", "4.67.1", []), ("numpy", "2.2.6", []),
    ("tokenizers", "0.22.2", ["huggingface-hub<2.0,>=0.16.4"]), ("safetensors", "0.6.2", []),
    ("regex", "2025.9.18", []),
    ("hydra-core", "1.3.2", ["omegaconf<2.4,>=2.2", "antlr4-python3-runtime==4.9.*", "packaging"]),
    ("omegaconf", "2.3.0", ["antlr4-python3-runtime==4.9.*", "PyYAML>=5.1.0"]),
    ("antlr4-python3-runtime", "4.9.3", []), ("pyyaml", "6.0.4", []), ("packaging", "25.0", []),
    ("datasets", "4.1.1", ["huggingface-hub>=0.35.0", "fsspec[http]<=2025.9.0,>=2023.1.0", "tqdm>=4.66.3",
                           "dill<0.4.1,>=0.3.0", "tomli; python_version < '3.11'"]),
    ("dill", "0.4.0", []), ("tomli", "2.2.1", []),
    ("pytest", "8.4.2", ["iniconfig>=1", "pluggy<2,>=1.5", "packaging>=20", "pygments>=2.7.2",
                         "exceptiongroup>=1; python_version < '3.11'", "colorama>=0.4; sys_platform == 'win32'"]),
    ("iniconfig", "2.1.0", []), ("pluggy", "1.6.0", []), ("exceptiongroup", "1.3.0", []), ("pygments", "2.19.2", []),
    ("colorama", "0.4.6", []),
)  # fmt: skip
TOP = [Requirement(r) for r in ("torch>=2.4", "transformers>=4.46", "hydra-core>=1.3", "datasets>=2.18", "numpy",
                                "lm-eval[hf]>=0.4; extra == 'lmeval'", "pytest>=7")]  # fmt: skip


def _names(sel) -> set[str]:
    return {r.name for r in sel.download}


def test_freeze_parsing():
    f = wh.read_freeze(textwrap.dedent("""\
        # a comment
        torch==2.5.1+cu121
        Huggingface_Hub==0.36.2
        -e git+https://example.org/repo.git@abc#egg=mine
        local-pkg @ file:///tmp/local_pkg-1.0-py3-none-any.whl
        nvidia-cudnn-cu12==9.1.0.70  # trailing comment
    """))  # fmt: skip
    assert f["torch"] == wh.Version("2.5.1+cu121") and f["huggingface-hub"] == wh.Version("0.36.2")
    assert f["local-pkg"] is None and "mine" not in f and f["nvidia-cudnn-cu12"] == wh.Version("9.1.0.70")
    # An unknown version (a direct reference) satisfies only a requirement without a version.
    assert wh.satisfied(None, [Requirement("local-pkg")]) and not wh.satisfied(None, [Requirement("local-pkg>=1")])
    # A local CUDA build meets the public specifiers asked of it.
    assert wh.satisfied(f["torch"], [Requirement("torch>=2.4")])


def test_selection_without_a_freeze_takes_the_closure_but_never_torch_or_cuda():
    sel = wh.select(TOP, RESOLVED, None, LINUX_310)
    got = _names(sel)
    assert not {n for n in got if wh.excluded(n)}
    assert {"transformers", "huggingface-hub", "hf-xet", "hydra-core", "antlr4-python3-runtime", "datasets", "tomli",
            "exceptiongroup", "pytest"} <= got  # fmt: skip
    # torch's own dependencies are left to the node; filelock comes anyway through the hub.
    assert "sympy" not in got and "mpmath" not in got and "filelock" in got
    assert "colorama" not in got  # Windows only
    assert "lm-eval" not in got and not sel.unresolved  # an extra not asked for
    assert sel.from_node == {"torch": [">=2.4"]}
    # On Python 3.11 the backports are not needed.
    assert "tomli" not in _names(wh.select(TOP, RESOLVED, None, wh.target_environment("3.11", None, None)))


def test_selection_leaves_out_what_the_node_freeze_satisfies():
    freeze = wh.read_freeze((DATA / "node-freeze.txt").read_text())
    sel = wh.select(TOP, RESOLVED, freeze, LINUX_310)
    got = _names(sel)
    # The node has torch, transformers and their dependencies at compatible versions.
    assert not {"transformers", "tokenizers", "safetensors", "numpy", "regex", "huggingface-hub", "hf-xet",
                "pyyaml", "packaging", "tqdm"} & got  # fmt: skip
    assert "transformers==4.57.1" in sel.kept_on_node and "numpy==2.2.6" in sel.kept_on_node
    # What it lacks comes, with the dependencies only those need.
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "datasets", "dill", "tomli", "pytest"} <= got
    # fsspec: the node's 2026.9.0 breaks datasets' fsspec<=2025.9.0, so the resolved one is shipped.
    assert "fsspec" in got
    assert sel.from_node == {"torch": [">=2.4"]}


def test_selection_ships_a_package_the_node_has_at_an_incompatible_version():
    freeze = wh.read_freeze("transformers==4.40.0\ntokenizers==0.19.1\nhuggingface-hub==0.36.2\nnumpy==2.2.6\n")
    got = _names(wh.select(TOP, RESOLVED, freeze, LINUX_310))
    assert {"transformers", "tokenizers"} <= got  # too old for >=4.46, and the new transformers needs a new tokenizers
    assert "numpy" not in got and "huggingface-hub" not in got  # compatible with every requirement on them


def test_selection_follows_requested_extras():
    resolved = _graph(("a", "1.0", ["b[x]"]), ("b", "1.0", ["c; extra == 'x'", "d; extra == 'y'"]),
                      ("c", "1.0", []), ("d", "1.0", []))  # fmt: skip
    got = _names(wh.select([Requirement("a")], resolved, None, LINUX_310))
    assert got == {"a", "b", "c"}


def test_target_environment_follows_the_platform_tag():
    env = wh.target_environment("3.12.1", "macosx_14_0_arm64", "cp")
    assert (env["python_version"], env["python_full_version"], env["sys_platform"], env["platform_machine"]) == (
        "3.12", "3.12.1", "darwin", "arm64")  # fmt: skip
    assert LINUX_310["platform_system"] == "Linux" and LINUX_310["python_full_version"] == "3.10.0"


def test_a_glibc_platform_tag_covers_older_glibc_and_legacy_aliases():
    tags = wh.expand_platforms(["manylinux_2_28_x86_64", "win_amd64"])
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_5_x86_64" in tags and "win_amd64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags and len(tags) == len(set(tags))


def test_bad_freeze_path_is_one_line_exit_2(tmp_path, capsys):
    assert wh.main(["--freeze", str(tmp_path / "missing.txt"), "--dest", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compress-order: error: --freeze") and "no such file" in err[0]
    assert wh.main(["--python-version", "ten", "--dest", str(tmp_path / "w")]) == 2
    assert "--python-version ten: give a Python 3 version, e.g. 3.10" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_wheelhouse(tmp_path_factory) -> Path:
    """A folder with one small pure wheel, built from a generated project with the venv's setuptools."""
    src = tmp_path_factory.mktemp("tinypkg")
    (src / "gpu_check_tiny").mkdir()
    (src / "gpu_check_tiny" / "__init__.py").write_text("VALUE = 42\n")
    (src / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "gpu-check-tiny"
        version = "1.0"
        [tool.setuptools]
        packages = ["gpu_check_tiny"]
    """))  # fmt: skip
    house = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(house), str(src)], check=True, capture_output=True)  # fmt: skip
    assert len(list(house.glob("*.whl"))) == 1
    return house


def test_install_into_a_private_target_from_a_local_wheel_folder(tiny_wheelhouse, tmp_path):
    site = tmp_path / "site"
    assert gc.install(tiny_wheelhouse, site, sys.executable) == 1
    assert (site / "gpu_check_tiny" / "__init__.py").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", "import gpu_check_tiny as t; print(t.VALUE, t.__file__)"],
                         capture_output=True, text=True, env=env, check=True).stdout.split()  # fmt: skip
    assert out[0] == "42" and out[1].startswith(str(site))
    # The running interpreter's own packages are untouched.
    assert subprocess.run([sys.executable, "-c", "import gpu_check_tiny"], capture_output=True).returncode != 0
    # Same wheels again: nothing reinstalled (the stamp matches).
    marker = site / "gpu_check_tiny" / "marker"
    marker.write_text("kept")
    gc.install(tiny_wheelhouse, site, sys.executable)
    assert marker.is_file()


def test_install_from_an_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(gc.CheckError, match="no wheels in"):
        gc.install(tmp_path, tmp_path / "site", sys.executable)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_check_without_cuda_exits_2_with_one_line(tiny_wheelhouse, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--wheelhouse", str(tiny_wheelhouse),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)  # fmt: skip
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1
    assert (
        err[0].startswith("compress-order: error: no CUDA device: torch ") and "run gpu-check on a GPU node" in err[0]
    )
    assert not (tmp_path / "out" / "site").exists()  # nothing installed without a GPU


def test_unknown_check_is_one_line_exit_2(capsys):
    assert gc.main(["--no-install", "--only", "warp_drive"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown check warp_drive; valid: cuda_tests, end_to_end" in err[0]


def _fake(name: str, body: str, timeout: float = 30) -> "gc.Check":
    code = "import json, os, sys, time, subprocess\nout = os.environ['GPU_CHECK_RESULT']\n" + textwrap.dedent(body)
    return gc.Check(name, f"fake {name}", [sys.executable, "-c", code], timeout)


def test_report_records_passed_failed_skipped_and_timed_out(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    checks = [
        _fake("ok", "json.dump({'status': 'passed', 'figures': {'ppl': 5.5, 'rows': 3}}, open(out, 'w'))"),
        _fake("bad", "json.dump({'status': 'failed', 'reason': 'ppl 9.1 vs 5.5', 'figures': {}}, open(out, 'w'))"),
        _fake("crash", "print('Traceback ...'); raise SystemExit('boom: no kernel')"),
        _fake("skip", "json.dump({'status': 'skipped', 'reason': 'no bf16 on this GPU'}, open(out, 'w'))"),
        # Sleeps past its timeout (long enough for a loaded machine to start it), with a grandchild that must die
        # with it.
        _fake(
            "slow",
            f"p = subprocess.Popen(['sleep', '60']); open({str(pidfile)!r}, 'w').write(str(p.pid))\ntime.sleep(60)",
            timeout=5,
        ),  # fmt: skip
        _fake("liar", "json.dump({'status': 'passed'}, open(out, 'w')); sys.exit(3)"),
    ]
    seen = []
    results = gc.run_checks(checks, 60, tmp_path, dict(os.environ), {"gpu": "fake"}, seen.append)
    assert [r.status for r in results] == ["passed", "failed", "failed", "skipped", "timed out", "failed"]
    assert [r.name for r in seen] == [c.name for c in checks]
    assert results[2].reason.startswith("exit code 1: boom: no kernel")
    assert results[4].reason == "cut off after 5 s" and results[5].reason.startswith("exit code 3")
    grandchild = int(pidfile.read_text())
    time.sleep(0.2)
    stat = Path(f"/proc/{grandchild}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX"  # gone, or dead unreaped

    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["gpu"] == "fake" and doc["passed"] == 1 and doc["total"] == 6
    by = {c["name"]: c for c in doc["checks"]}
    assert by["ok"]["figures"] == {"ppl": 5.5, "rows": 3} and by["bad"]["reason"] == "ppl 9.1 vs 5.5"
    assert by["skip"]["reason"] == "no bf16 on this GPU" and by["slow"]["status"] == "timed out"
    md = (tmp_path / "report.md").read_text()
    assert "| slow | timed out |" in md and "| skip | skipped |" in md and "- ppl: 5.5" in md
    assert (tmp_path / "logs" / "crash.log").read_text().startswith("Traceback")


def test_a_check_cut_off_keeps_the_figures_it_wrote_so_far(tmp_path):
    body = """
        json.dump({'status': 'running', 'figures': {'gptq seconds': 41.5}}, open(out, 'w'))
        time.sleep(60)
    """
    (res,) = gc.run_checks([_fake("large", body, timeout=2)], 60, tmp_path, dict(os.environ), {})
    assert res.status == "timed out" and res.figures == {"gptq seconds": 41.5}
    assert "- gptq seconds: 41.5" in (tmp_path / "report.md").read_text()


def test_budget_caps_each_check_and_the_rest_is_skipped(tmp_path):
    checks = [_fake("first", "time.sleep(60)", timeout=30),
              _fake("second", "json.dump({'status': 'passed'}, open(out, 'w'))")]  # fmt: skip
    results = gc.run_checks(checks, 1.5, tmp_path, dict(os.environ), {})
    assert results[0].status == "timed out" and "budget" in results[0].reason and results[0].seconds < 10
    assert results[1].status == "skipped" and "budget was spent" in results[1].reason
    # The report on disk was written as the checks went: the last state is complete.
    doc = json.loads((tmp_path / "report.json").read_text())
    assert [c["status"] for c in doc["checks"]] == ["timed out", "skipped"]


def test_reference_values_are_complete_and_their_tolerance_follows_the_measured_spread():
    ref = json.loads((DATA / "gpu_reference.json").read_text())
    gr = _load("gpu_reference")
    assert ref["commands"] == gr.COMMANDS and ref["common"] == gr.COMMON
    # Every node of each command's trie: the dense baseline, each prefix, each full order (and the joint one).
    assert set(ref["perplexity"]["sparsegpt_gptq"]) == {"dense", "sparsegpt", "gptq", "sparsegpt > gptq",
                                                       "gptq > sparsegpt", "sparsegpt+gptq"}  # fmt: skip
    assert set(ref["perplexity"]["wanda_rtn"]) == {"dense", "wanda", "rtn", "wanda > rtn", "rtn > wanda"}
    assert set(ref["spread"]) == set(gr.PERTURBATIONS)
    for name in ref["commands"]:
        ppl = ref["perplexity"][name]
        assert all(1 < v < 20 for v in ppl.values()) and ppl["dense"] == min(ppl.values())
        spread = max(d for per in ref["spread"].values() for d in per[name].values())
        assert ref["rel_tolerance"][name] == pytest.approx(max(gr.MARGIN * spread, gr.FLOOR))
    # Orders of calibrated stages with error feedback are the sensitive ones: they set the looser tolerance.
    assert ref["rel_tolerance"]["sparsegpt_gptq"] > ref["rel_tolerance"]["wanda_rtn"]


def _dry_run(name: str, tmp_path: Path, *extra: str) -> dict:
    """A check's code path on the CPU (`--device cpu`): its plumbing, not anything CUDA does."""
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "GPU_CHECK_RESULT": str(tmp_path / "result.json")}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_checks.py"), name, "--device", "cpu", *extra],
                   env=env, cwd=ROOT, capture_output=True)  # fmt: skip
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.slow
def test_end_to_end_check_on_cpu_reproduces_the_reference(tmp_path):
    res = _dry_run("end_to_end", tmp_path)
    assert res["status"] == "passed", res["reason"]
    assert res["figures"]["max_rel_diff"] <= max(json.loads((DATA / "gpu_reference.json").read_text())
                                                 ["rel_tolerance"].values())  # fmt: skip


@pytest.mark.slow
def test_packed_backends_and_large_model_checks_run_on_cpu(tmp_path):
    res = _dry_run("packed_backends", tmp_path / "p", "--small")
    assert res["status"] == "passed", res["reason"]
    assert "int4_weight_only" in res["figures"]["speed"] and "int8_weight_only" in res["figures"]["logits"]
    res = _dry_run("large_model", tmp_path / "l", "--small")
    assert res["status"] == "passed", res["reason"]
    assert "| gptq | calibrate + compress |" in res["figures"]["timings"]


def test_float_kernels_check_runs_fp8_scaled_mm_on_cpu_and_names_the_cuda_only_paths(tmp_path):
    """torch 2.14 has torch._scaled_mm on CPU: the dry run multiplies the node's own FP8 codes with rowwise scales
    (every weight held, output within bf16 rounding of the dense FP8 product); the CUDA-only torchao paths are
    rows saying so, not failures."""
    res = _dry_run("float_kernels", tmp_path, "--small")
    assert res["status"] == "passed", res["reason"]
    (row,) = [r for r in res["figures"]["accuracy"].splitlines() if r.startswith("| fp8 _scaled_mm |")]
    held, err, tol = (c.strip() for c in row.strip("|").split("|")[2:])
    assert int(held) == 0 and float(err) <= float(tol) == 0.01
    for path in ("torchao float8", "torchao mxfp4", "torchao nvfp4"):
        assert f"| {path} | CUDA only |" in res["figures"]["not run"]
