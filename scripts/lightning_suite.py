"""Run Lightning's own Fabric tests, parity scripts and examples against notebook_fabric.

Outside the project's test suite: Lightning is not a dependency. Whoever has a checkout of
Lightning-AI/pytorch-lightning (v2.6.x) runs, from this project's venv::

    python scripts/lightning_suite.py --lightning ~/pytorch-lightning tests [-- PYTEST ARGS]
    python scripts/lightning_suite.py --lightning ~/pytorch-lightning parity   # test_parity_ddp on 2 CPU ranks
    python scripts/lightning_suite.py --lightning ~/pytorch-lightning [--marked] example reinforcement_learning/train_fabric.py [ARGS]

``tests`` copies ``tests/tests_fabric`` and ``tests/parity_fabric`` into a temporary folder and runs
pytest there with ``scripts/lightning_shim`` first on the path: a package named ``lightning`` whose
``fabric`` is notebook_fabric (and a stand-in ``lightning.pytorch.LightningModule`` for the
examples). Lightning's test helpers need ``lightning-utilities``, ``tensorboardX`` and
``jsonargparse``, the reinforcement-learning example ``gymnasium`` and ``torchmetrics``; they are installed with ``pip --target`` into ``--deps`` (a folder of their
own, default ``~/.cache/notebook-fabric/lightning-suite``), never into the venv. The summary lists
the failing tests (``--report FILE`` writes them as JSON); compare with docs/lightning-differences.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
SHIM = HERE / "lightning_shim"
TEST_DEPENDENCIES = ["lightning-utilities==0.15.3", "tensorboardX==2.6.5", "jsonargparse==4.53.0",
                     "gymnasium==1.4.0", "farama-notifications==0.0.6", "torchmetrics==1.9.0"]
DEFAULT_DEPS = Path.home() / ".cache" / "notebook-fabric" / "lightning-suite"


def ensure_dependencies(deps: Path) -> None:
    """Lightning's test helpers, in a folder of their own (``pip --target``, no dependencies pulled)."""
    if all((deps / name).is_dir() for name in ("lightning_utilities", "jsonargparse", "gymnasium", "torchmetrics")):
        return
    deps.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(deps),
                    *TEST_DEPENDENCIES], check=True)


def environment(deps: Path, *extra: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(map(str, [SHIM, deps, *extra, env.get("PYTHONPATH", "")])).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


#: edits to the copied tests so that a file collects; each is a deliberate difference named on
#: docs/lightning-differences.md (the tests that need them still run and fail or pass on their own)
COLLECTION_PATCHES = {
    # SLURMEnvironment() reads (and checks) the SLURM variables when it is built: outside a job, the
    # module-level parametrize list would fail the whole file. Build it inside a fake job's variables.
    "tests_fabric/test_connector.py": [
        ("[LightningEnvironment(), SLURMEnvironment()]", "[LightningEnvironment(), _slurm_environment()]"),
        ("LightningEnvironment(), SLURMEnvironment()],", "LightningEnvironment(), _slurm_environment()],"),
    ],
}
_SLURM_HELPER = '''
def _slurm_environment():
    import os
    from unittest import mock
    from lightning.fabric.plugins.environments import SLURMEnvironment
    fake_job = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "1"}
    with mock.patch.dict(os.environ, fake_job):
        return SLURMEnvironment()

'''


def copy_tests(lightning: Path, into: Path) -> Path:
    tests = into / "tests"
    for name in ("tests_fabric", "parity_fabric"):
        shutil.copytree(lightning / "tests" / name, tests / name)
    for relative, replacements in COLLECTION_PATCHES.items():
        path = tests / relative
        text = path.read_text()
        for old, new in replacements:
            text = text.replace(old, new)
        path.write_text(_SLURM_HELPER + text)
    return tests


def run_tests(lightning: Path, deps: Path, pytest_args: List[str], report: Path | None) -> int:
    with tempfile.TemporaryDirectory(prefix="lightning-suite-") as folder:
        tests = copy_tests(lightning, Path(folder))
        junit = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tests),
                   f"--junitxml={junit}", "-o", "junit_family=xunit1", "--timeout=300", "-p", "lightning_suite_plugin",
                   *(pytest_args or ["tests_fabric", "parity_fabric"])]
        code = subprocess.run(command, cwd=tests, env=environment(deps, tests)).returncode
        if junit.exists():
            summarize(junit, report)
        return code


def summarize(junit: Path, report: Path | None) -> None:
    """Counts, then every failing test with the first line of its message."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failing: Dict[str, str] = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        kind = "failed" if outcome.tag == "failure" else outcome.tag
        counts[kind] += 1
        if kind != "skipped":
            failing[name] = (outcome.get("message") or "").splitlines()[0][:200] if outcome.get("message") else ""
    print("\nlightning_suite: " + ", ".join(f"{value} {key}" for key, value in counts.items()))
    for name, message in sorted(failing.items()):
        print(f"  FAIL {name}: {message}")
    if report is not None:
        report.write_text(json.dumps({"counts": counts, "failing": failing}, indent=1, sort_keys=True))


#: (pattern in the test id or its first error line, class, reason): the first match classifies a failing test
CLASSIFICATION = [
    # reviewed one by one (scripts/lightning_suite.py classify; the first match wins)
    ("test_parity_simple.py::test_parity_single_device", "timing",
     "compares the time per iteration with raw PyTorch within 0.02 s; passes alone, not on a loaded machine"
     " (Lightning marks it flaky)"),
    ("test_csv.py::test_append_metrics_file", "private API",
     "patches `_ExperimentWriter._check_log_dir_exists` so that a second logger appends to version_0"),
    ("environments/test_lightning.py::test_teardown", "deliberate",
     "LocalEnvironment.teardown leaves WORLD_SIZE to the launcher that set it"),
    ("precision/test_xla.py", "deliberate", "one TruePrecision/MixedPrecision for XLA too (no XLAPrecision class)"),
    ("test_multiprocessing_integration.py::test_memory_sharing_disabled", "private API",
     "reads `strategy.launcher._start_method` (Lightning's private launcher); the behaviour it checks is"
     " implemented (ddp_spawn: tensor arguments shared, module parameters and buffers copied, tied weights"
     " tied): with `fabric.strategy.start_method` in its place both cases pass"),
    ("strategies/test_ddp.py::test_ddp_module_state_dict", "private API", "calls DDPStrategy.get_module_state_dict on a raw DDP"),
    ("test_deepspeed.py::test_deepspeed_config_zero_offload", "deliberate",
     "offload settings not given are left to DeepSpeed's defaults instead of spelled out"),
    ("test_deepspeed.py::test_deepspeed_custom_activation_checkpointing_params", "deliberate",
     "activation-checkpointing settings go in config= (see Strategies)"),
    ("test_deepspeed.py::test_deepspeed_save_checkpoint_exclude_frozen_parameters", "deliberate",
     "exclude_frozen_parameters goes in config= (see Strategies)"),
    ("test_deepspeed.py::test_deepspeed_load_checkpoint", "private API",
     "mocks the DeepSpeed engine; with no model set up here the strategy refuses first"),
    ("test_deepspeed.py::test_deepspeed_save_checkpoint_client_state_separation", "private API", "mocks the engine"),
    ("test_deepspeed.py::test_deepspeed_save_checkpoint_warn_colliding_keys", "private API", "mocks the engine"),
    ("test_deepspeed.py::test_deepspeed_only_compatible_with_cuda", "private API",
     "drives a strategy object without Fabric (the connector gives it its cluster environment)"),
    ("test_deepspeed.py::test_validate_parallel_devices_indices", "private API",
     "drives a strategy object without Fabric (the connector gives it its cluster environment)"),
    ("test_deepspeed.py::test_deepspeed_setup_module", "private API", "patches DeepSpeed's accelerator to CUDA on a CPU machine"),
    ("test_deepspeed.py::test_deepspeed_with_env_path", "deliberate",
     "the config file in PL_DEEPSPEED_CONFIG_PATH is not read (pass config=)"),
    ("strategies/test_dp.py::test_data_parallel_setup_module", "deliberate",
     "parallel_devices are torch.device objects, not indices"),
    ("strategies/test_fsdp.py", "deliberate",
     "FSDP is FSDP2 (fully_shard) here; the FSDP1 arguments are mapped, not kept (see Strategies)"),
    ("test_model_parallel.py::test_torch_greater_equal_2_4", "private API", "patches `_TORCH_GREATER_EQUAL_2_4`"),
    ("test_model_parallel.py::test_meta_device_materialization", "private API", "patches the module's reset_parameters check"),
    ("test_model_parallel.py::test_save_checkpoint_one_dist_module_required", "wording",
     "saving without a set-up module is refused later, in other words"),
    ("test_model_parallel.py", "private API",
     "drives the strategy without launching (the device mesh exists once the ranks started) or mocks"
     " torch.distributed.checkpoint"),
    ("test_registry.py::test_available_strategies_in_registry", "deliberate",
     "the registry has all of Lightning's names plus ddp_forkserver, single_device, model_parallel, xla_debug"
     " (see Strategies)"),
    ("test_registry.py::test_strategy_registry_with_new_strategy", "deliberate",
     "the registry takes Strategy subclasses only"),
    ("strategies/test_strategy.py", "private API",
     "drives a strategy object without Fabric (the connector gives it its checkpoint IO)"),
    ("test_connector.py", "private API", "builds Lightning's private `_Connector` directly"),
    ("test_fabric.py::test_backward_model_input_required", "wording",
     "DeepSpeed with two models and backward(model=None) is refused, in other words"),
    ("test_fabric.py::test_backward_required", "private API",
     "asserts that the output tensor has `_backward_hooks` (how Lightning implements the check); the check itself"
     " is here for 16-mixed and DeepSpeed, not for bf16-mixed (no loss scaling to skip)"),
    ("test_fabric.py::test_fabric_load", "private API", "replaces the strategy with a mock"),
    ("test_fabric.py::test_load_raw", "private API", "replaces the strategy's load with a mock"),
    ("test_fabric.py::test_load_wrapped_objects", "private API", "replaces strategy.load_checkpoint with a function"),
    ("test_fabric.py::test_launch_and_cli_not_allowed", "deliberate", "launch() under the CLI does nothing"),
    ("test_fabric.py::test_overridden_run_and_cli_not_allowed", "deliberate", "Fabric.run() is not supported"),
    ("test_fabric.py::test_launch_and_strategies_unsupported_combinations", "wording",
     "launch() without a function under ddp_spawn raises RuntimeError (Lightning: TypeError), naming the fix"),
    ("test_fabric.py::test_rank_zero_first", "private API", "replaces the strategy's barrier with a mock"),
    ("test_fabric.py::test_seed_everything", "private API", "expects `worker_init_fn` to be a partial of pl_worker_init_function"),
    ("test_fabric.py::test_setup_dataloaders_captures_dataloader_arguments", "deliberate",
     "DataLoader.__init__ is not patched inside launch() (see Fabric)"),
    ("test_fabric.py::test_setup_dataloaders_move_to_device", "private API", "patches the device of the strategy"),
    ("test_fabric.py::test_setup_dataloaders_raises_for_unknown_custom_args", "wording",
     "the same refusal (TypeError naming the argument), in this project's words"),
    ("test_fabric.py::test_setup_optimizers_not_supported", "private API",
     "replaces the strategy with a mock (the real DeepSpeed strategy refuses setup_optimizers)"),
    ("test_wrappers.py::test_fabric_module_setattr", "deliberate",
     "the attribute behaviour is Lightning's; the test also asserts that the wrapper class defines no __repr__"
     " (here it prints FabricModule(<your module>))"),
    ("test_wrappers.py::test_step_method_redirection", "private API", "mocks the forward module"),
    ("test_imports.py::test_import_fabric_with_torch_dist_unavailable", "deliberate",
     "this project needs torch.distributed (every launcher uses it)"),
    ("test_rank_zero.py::test_rank_zero_known_environment_variables", "private API", "Lightning's `_get_rank` variable list"),
    ("test_warnings.py", "private API", "Lightning's PossibleUserWarning and its POSSIBLE_USER_WARNINGS switch"),
    ("accelerators/test_cuda.py", "private API", "patches CUDA/NVML queries"),
    ("accelerators/test_mps.py", "private API", "patches MPS availability"),
    ("accelerators/test_cpu.py::test_init_device_with_wrong_device_type", "deliberate",
     "CPUAccelerator.setup_device takes any device the connector chose"),
    ("tests_fabric/test_cli.py", "deliberate",
     "Lightning's `fabric run` CLI (`lightning.fabric.cli`); this project's is `notebook-fabric run`, torchrun-based,"
     " with its own flags and refusals"),
    ("test_consolidate_checkpoint.py", "private API", "Lightning's checkpoint-consolidation CLI module"),
    ("graveyard/", "private API", "Lightning's graveyard of removed TPU names (an ImportError pointing to XLA names)"),
    ("has no counterpart in notebook_fabric", "private API",
     "uses a Lightning-internal name (a `_private` function, class or module) that has no counterpart here"),
    ("<missing lightning", "private API", "asserts on a Lightning-internal function that has no counterpart here"),
    ("is not subscriptable", "private API", "calls a Lightning-internal helper that has no counterpart here"),
    ("does not support the context manager protocol", "private API",
     "uses a Lightning-internal context manager that has no counterpart here"),
    ("join() argument must be str", "private API", "reads `_ExperimentWriter.NAME_METRICS_FILE`, an internal constant"),
    ("sched_getaffinity", "private API", "patches the `os` module Lightning's device helpers import"),
    ("PL_GLOBAL_SEED", "deliberate", "the seed variable is NOTEBOOK_FABRIC_GLOBAL_SEED (see `seed_everything`)"),
    ("PL_SEED_WORKERS", "deliberate", "the workers variable is NOTEBOOK_FABRIC_SEED_WORKERS"),
    ("test_seed.py::test_correct_seed_with_environment_variable", "deliberate", "reads PL_GLOBAL_SEED"),
    ("test_seed.py::test_seed_everything_accepts_valid_seed_from_env", "deliberate", "reads PL_GLOBAL_SEED"),
    ("test_seed.py::test_invalid_seed", "deliberate", "sets PL_GLOBAL_SEED"),
    ("leaking environment variable", "deliberate",
     "the test's guard allows Lightning's own variables (PL_GLOBAL_SEED, ...); this project exports"
     " NOTEBOOK_FABRIC_GLOBAL_SEED / _SEED_WORKERS (and DeepSpeed its DS_* ones) instead"),
    ("lightning_logs", "deliberate", "the default logger name is notebook_fabric_logs"),
    ("SLURMEnvironment needs", "deliberate",
     "SLURMEnvironment reads and checks the SLURM variables when it is built (a clear error before any rank"
     " starts); Lightning's reads them on use, so its tests build one outside a job"),
    ("is outside the job", "deliberate", "the scheduler's variables are checked against each other when read"),
    ("MPIEnvironment needs", "deliberate", "MPIEnvironment reads the launcher's variables when built (no mpi4py)"),
    ("TorchElasticEnvironment needs", "deliberate", "TorchElasticEnvironment reads torchrun's variables when built"),
    ("test_mpi.py", "deliberate", "MPIEnvironment reads OMPI_*/PMI_* variables instead of importing mpi4py"),
    ("test_lsf.py", "deliberate", "LSF is not one of this project's environments (an unknown environment is a plugin)"),
    ("test_kubeflow.py", "deliberate", "Kubeflow jobs are torchrun jobs here (TorchElasticEnvironment)"),
    ("test_csv.py::test_log_hyperparams", "deliberate", "CSVLogger.log_hyperparams writes hparams.yaml (a superset)"),
    ("test_csv.py::test_manual_versioning_file_exists", "deliberate",
     "the existing metrics.csv is announced when the logger is built and replaced by the first write"),
    ("test_tensorboard.py::test_tensorboard_expand_home", "deliberate", "root_dir is expanded (`~`) on both loggers"),
    ("test_tensorboard.py::test_tensorboard_finalize", "private API", "patches tensorboardX's SummaryWriter"),
    ("accelerators/test_cpu.py::test_get_parallel_devices", "deliberate",
     "accelerator classes: parse_devices(devices), then get_parallel_devices(indices)"),
    ("accelerators/test_xla.py::test_get_parallel_devices", "deliberate",
     "accelerator classes: parse_devices(devices), then get_parallel_devices(indices)"),
    ("test_device_parser.py", "private API", "Lightning's device parser (`_parse_gpu_ids`), MisconfigurationException"),
    ("MisconfigurationException", "wording", "this project raises ValueError/TypeError, not MisconfigurationException"),
    ("Regex pattern did not match", "wording", "the same error is raised, in this project's words"),
    ("expected call not found", "private API", "asserts how Lightning calls its internals (a mock)"),
    ("to have been called", "private API", "asserts how Lightning calls its internals (a mock)"),
    ("to be called once", "private API", "asserts how Lightning calls its internals (a mock)"),
    ("mock", "private API", "patches or asserts on Lightning's internals with a mock"),
    ("Mock", "private API", "patches or asserts on Lightning's internals with a mock"),
    ("object has no attribute '_", "private API", "reads a private attribute of Lightning's objects"),
    ("torch_xla", "deliberate", "torch_xla is not installed here; Lightning's tests mock it"),
]


def classify(report: Path) -> str:
    """A markdown table of the failing tests in ``report`` (written by ``tests --report``)."""
    failing = json.loads(report.read_text())["failing"]
    rows = []
    for name, message in sorted(failing.items()):
        found = next(((kind, why) for pattern, kind, why in CLASSIFICATION if pattern in name or pattern in message),
                     ("unclassified", message.replace("|", "\\|")[:160]))
        rows.append(f"| `{name}` | {found[0]} | {found[1]} |")
    return "\n".join(["| Lightning test | class | reason |", "|---|---|---|", *rows])


def run_parity(lightning: Path, deps: Path, devices: int, tolerance: float) -> int:
    """``test_parity_ddp`` as Lightning's CI runs it (``parity_fabric/run_standalone_tasks.sh``): from
    ``tests/parity_fabric``, ``python -m test_parity_ddp --accelerator=cpu --devices=2 --tolerance=T``."""
    with tempfile.TemporaryDirectory(prefix="lightning-parity-") as folder:
        tests = copy_tests(lightning, Path(folder))
        parity = tests / "parity_fabric"
        command = [sys.executable, "-m", "test_parity_ddp", "--accelerator=cpu", f"--devices={devices}",
                   f"--tolerance={tolerance}"]
        code = subprocess.run(command, cwd=parity, env=environment(deps, parity, tests)).returncode
        print(f"lightning_suite: test_parity_ddp exited with code {code}")
        return code


#: ``--marked``: the edit Lightning's own error asks for, where an example calls a method of its DDP
#: model that runs the model's layers outside forward (it fails the same way under Lightning 2.6)
EXAMPLE_PATCHES = {
    "reinforcement_learning/train_fabric.py": [(
        "    agent, optimizer = fabric.setup(agent, optimizer)\n",
        "    agent, optimizer = fabric.setup(agent, optimizer)\n"
        "    agent.mark_forward_method('get_action_and_value')\n"
        "    agent.mark_forward_method('estimate_returns_and_advantages')\n",
    )],
}


def run_example(lightning: Path, deps: Path, example: str, arguments: List[str], devices: int, marked: bool) -> int:
    """``notebook-fabric run --accelerator cpu --strategy ddp --devices N`` on a copy of one of
    ``examples/fabric`` (with :data:`EXAMPLE_PATCHES` applied when ``marked``)."""
    source = lightning / "examples" / "fabric" / example
    with tempfile.TemporaryDirectory(prefix="lightning-example-") as folder:
        copy = Path(folder) / "example"
        shutil.copytree(source.parent, copy)
        script = copy / source.name
        if marked:
            text = script.read_text()
            for old, new in EXAMPLE_PATCHES.get(example, []):
                if old not in text:
                    raise SystemExit(f"lightning_suite: the patch for {example} no longer applies: {old!r}")
                text = text.replace(old, new)
            script.write_text(text)
        command = [sys.executable, "-m", "notebook_fabric", "run", "--accelerator", "cpu", "--strategy", "ddp",
                   "--devices", str(devices), str(script), *arguments]
        code = subprocess.run(command, cwd=copy, env=environment(deps, copy)).returncode
        print(f"lightning_suite: {example}{' (marked)' if marked else ''} exited with code {code}")
        return code


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lightning", type=Path, required=True, help="a checkout of Lightning-AI/pytorch-lightning")
    parser.add_argument("--deps", type=Path, default=DEFAULT_DEPS, help="where Lightning's test helpers are installed")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.02, help="parity: the timing tolerance (CI: 0.01-0.02)")
    parser.add_argument("--marked", action="store_true", help="example: apply the mark_forward_method edit")
    parser.add_argument("--report", type=Path, help="write the counts and failing tests as JSON")
    parser.add_argument("what", choices=["tests", "parity", "example", "classify"])
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="pytest arguments, or the example and its arguments")
    options = parser.parse_args(argv)
    lightning = options.lightning.expanduser().resolve()
    if not (lightning / "tests" / "tests_fabric").is_dir():
        parser.error(f"{lightning} is not a checkout of pytorch-lightning (no tests/tests_fabric)")
    if options.what == "classify":
        if options.report is None:
            parser.error("classify reads --report FILE (written by: tests --report FILE)")
        print(classify(options.report))
        return 0
    ensure_dependencies(options.deps)
    rest = [arg for arg in options.rest if arg != "--"]
    if options.what == "tests":
        return run_tests(lightning, options.deps, rest, options.report)
    if options.what == "parity":
        return run_parity(lightning, options.deps, options.devices, options.tolerance)
    if not rest:
        parser.error("example needs a path under examples/fabric, e.g. reinforcement_learning/train_fabric.py")
    return run_example(lightning, options.deps, rest[0], rest[1:], options.devices, options.marked)


if __name__ == "__main__":
    sys.exit(main())
