"""The launchers (launch/*.sh): each dry run prints exactly what it would run, and the real run
hands that same command to the tool (fake gcloud, sbatch, srun and kubectl on PATH record their
arguments), arguments holding spaces, quotes and shell characters arriving intact. A missing
setting is one error line naming the variable."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "experiments/digits_flow.py:test"
# What a user might pass on: spaces, quotes, a glob, shell operators, a variable, an empty word.
ARGS = ["--run_dir", "/shared/runs/a b", "--config.data.name=it's", 'x"y', "*", "a&b;c|d", "$HOME"]
ARGS += ["back\\slash", ""]
TRAIN = ["python", "-m", "pretzel_jax.train", "--distributed", "--config", EXPERIMENT, *ARGS]
TOOLS = ("gcloud", "sbatch", "srun", "kubectl")
TPU_VM = {"TPU_NAME": "my-v5e-32", "ZONE": "us-west4-a"}
SLURM = {"NODES": "3"}
GKE = {
    "IMAGE": "us-docker.pkg.dev/p/r/pretzel:1",
    "TPU_ACCELERATOR": "tpu-v5p-slice",
    "TPU_TOPOLOGY": "2x2x4",
    "SHARED_PVC": "runs",
    "NUM_SLICES": "2",
}


@pytest.fixture
def tools(tmp_path) -> Path:
    """A PATH folder whose gcloud, sbatch, srun and kubectl write their argv (NUL-separated)
    and stdin to `<tool>.args` / `<tool>.stdin` beside them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        script = bin_dir / tool
        script.write_text(
            "#!/usr/bin/env bash\n"
            f'printf "%s\\0" "$@" > "{bin_dir}/{tool}.args"\n'
            f'[[ -t 0 ]] || cat > "{bin_dir}/{tool}.stdin"\n'
        )
        script.chmod(0o755)
    return bin_dir


def _run(script: str, env: dict[str, str], bin_dir: Path, *args: str, dry: bool = True):
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": "/home/u", **env}
    if dry:
        full_env["DRY_RUN"] = "1"
    return subprocess.run(
        ["bash", f"launch/{script}", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )


def _called(bin_dir: Path) -> dict[str, list[str]]:
    """{tool: argv} of every fake tool that ran."""
    calls = {}
    for tool in TOOLS:
        path = bin_dir / f"{tool}.args"
        if path.exists():
            calls[tool] = path.read_text().split("\0")[:-1]
    return calls


def test_tpu_vm_dry_run_prints_the_gcloud_command_it_runs(tools):
    dry = _run("tpu_vm.sh", TPU_VM, tools, EXPERIMENT, *ARGS)
    assert dry.returncode == 0 and dry.stderr == "", dry.stderr
    assert _called(tools) == {}  # a dry run calls nothing
    [line] = dry.stdout.splitlines()
    argv = shlex.split(line)
    assert argv[:-2] == [
        *("gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5e-32"),
        *("--zone", "us-west4-a", "--worker=all"),
    ]
    assert argv[-2] == "--command"
    assert shlex.split(argv[-1]) == ["cd", "~/pretzel_jax", "&&", *TRAIN]  # every worker runs it

    real = _run("tpu_vm.sh", TPU_VM, tools, EXPERIMENT, *ARGS, dry=False)
    assert real.returncode == 0, real.stderr
    assert _called(tools) == {"gcloud": argv[1:]}


def test_tpu_vm_passes_the_project_when_set(tools):
    dry = _run("tpu_vm.sh", {**TPU_VM, "PROJECT": "my-project"}, tools, EXPERIMENT)
    argv = shlex.split(dry.stdout)
    assert argv[argv.index("--project") + 1] == "my-project"


def test_slurm_dry_run_prints_the_sbatch_command_it_runs(tools):
    dry = _run("slurm.sh", SLURM, tools, EXPERIMENT, *ARGS)
    assert dry.returncode == 0 and dry.stderr == "", dry.stderr
    assert _called(tools) == {}
    [line] = dry.stdout.splitlines()
    argv = shlex.split(line)
    assert argv == [
        *("sbatch", "--nodes=3", "--gpus-per-node=8", "--job-name=pretzel-digits_flow"),
        *("launch/slurm.sbatch", EXPERIMENT, *ARGS),
    ]

    real = _run("slurm.sh", SLURM, tools, EXPERIMENT, *ARGS, dry=False)
    assert real.returncode == 0, real.stderr
    assert _called(tools) == {"sbatch": argv[1:]}


def test_slurm_batch_script_runs_one_training_process_per_node(tools):
    """What sbatch runs on the allocation (#SBATCH --ntasks-per-node=1): srun of the CLI."""
    done = _run("slurm.sbatch", {}, tools, EXPERIMENT, *ARGS, dry=False)
    assert done.returncode == 0, done.stderr
    assert _called(tools) == {"srun": TRAIN}
    assert "#SBATCH --ntasks-per-node=1" in (ROOT / "launch/slurm.sbatch").read_text()


def test_gke_dry_run_prints_the_jobset_it_applies(tools):
    dry = _run("gke.sh", GKE, tools, EXPERIMENT, *ARGS)
    assert dry.returncode == 0 and dry.stderr == "", dry.stderr
    assert _called(tools) == {}
    first, manifest = dry.stdout.split("\n", 1)
    assert first == "# kubectl apply -f -  (2 slice(s) x 4 host(s) = 8 processes)"
    jobset = yaml.safe_load(manifest)
    assert jobset["kind"] == "JobSet" and jobset["metadata"]["name"] == "pretzel-digits-flow"
    [replicated] = jobset["spec"]["replicatedJobs"]
    assert replicated["replicas"] == 2  # slices
    job = replicated["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 4  # hosts per slice: 16 chips / 4
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
        "cloud.google.com/gke-tpu-topology": "2x2x4",
    }
    [container] = pod["containers"]
    assert container["image"] == GKE["IMAGE"]
    assert container["command"] == TRAIN
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "runs"

    real = _run("gke.sh", GKE, tools, EXPERIMENT, *ARGS, dry=False)
    assert real.returncode == 0, real.stderr
    assert _called(tools) == {"kubectl": ["apply", "-f", "-"]}
    assert (tools / "kubectl.stdin").read_text() == manifest


def test_gke_single_host_slices_and_job_name(tools):
    env = {**GKE, "TPU_TOPOLOGY": "2x2", "NUM_SLICES": "1", "JOB_NAME": "my-run"}
    jobset = yaml.safe_load(_run("gke.sh", env, tools, EXPERIMENT).stdout)
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert jobset["metadata"]["name"] == "my-run" and job["parallelism"] == 1


@pytest.mark.parametrize(
    "script, env, missing",
    [
        ("tpu_vm.sh", TPU_VM, "TPU_NAME"),
        ("tpu_vm.sh", TPU_VM, "ZONE"),
        ("slurm.sh", SLURM, "NODES"),
        *[("gke.sh", GKE, name) for name in ("IMAGE", "TPU_ACCELERATOR", "TPU_TOPOLOGY")],
        ("gke.sh", GKE, "SHARED_PVC"),
    ],
)
@pytest.mark.parametrize("dry", [True, False])
def test_a_missing_setting_is_one_error_line_naming_it(tools, script, env, missing, dry):
    env = {k: v for k, v in env.items() if k != missing}
    done = _run(script, env, tools, EXPERIMENT, dry=dry)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: set {missing} (")
    assert _called(tools) == {}


@pytest.mark.parametrize(
    "script, env, name",
    [
        ("slurm.sh", {"NODES": "four"}, "NODES"),
        ("gke.sh", {**GKE, "TPU_TOPOLOGY": "2x3"}, "TPU_TOPOLOGY"),  # 6 chips, 4 per host
        ("gke.sh", {**GKE, "TPU_TOPOLOGY": "2x2;rm"}, "TPU_TOPOLOGY"),
        ("gke.sh", {**GKE, "NUM_SLICES": "two"}, "NUM_SLICES"),
        ("gke.sh", {**GKE, "NUM_SLICES": "0"}, "NUM_SLICES"),
        ("gke.sh", {**GKE, "CHIPS_PER_HOST": "0"}, "CHIPS_PER_HOST"),
        ("gke.sh", {**GKE, "JOB_NAME": "My_Run"}, "JOB_NAME"),
    ],
)
def test_a_bad_setting_is_one_error_line_naming_it(tools, script, env, name):
    done = _run(script, env, tools, EXPERIMENT, dry=False)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: {name}=")
    assert _called(tools) == {}


LAUNCHERS = [("tpu_vm.sh", TPU_VM), ("slurm.sh", SLURM), ("gke.sh", GKE)]


@pytest.mark.parametrize("script, env", LAUNCHERS)
def test_no_experiment_is_a_usage_line(tools, script, env):
    done = _run(script, env, tools)
    assert done.returncode == 2 and done.stderr.startswith(f"usage: launch/{script} EXPERIMENT")
    assert _called(tools) == {}


def test_gke_rejects_an_argument_with_a_newline(tools):
    done = _run("gke.sh", GKE, tools, EXPERIMENT, "--config.x=a\nb", dry=False)
    assert done.returncode == 2 and "newline" in done.stderr and _called(tools) == {}


def test_launchers_are_valid_bash():
    for script in ("local.sh", "tpu_vm.sh", "slurm.sh", "slurm.sbatch", "gke.sh", "common.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "launch" / script)], capture_output=True)
        assert done.returncode == 0, (script, done.stderr)
    assert os.access(ROOT / "launch/gke.sh", os.X_OK)
