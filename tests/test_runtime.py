import pytest

from exporter import runtime


def test_placement_defaults_to_single_process():
    assert runtime.placement({}) == runtime.Placement(rank=0, local_rank=0, world_size=1)


def test_placement_from_torchrun():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    assert runtime.placement(env) == runtime.Placement(rank=5, local_rank=1, world_size=8)


def test_placement_from_slurm():
    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16"}
    assert runtime.placement(env) == runtime.Placement(rank=9, local_rank=3, world_size=16)


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "2", "SLURM_PROCID": "7", "LOCAL_RANK": "0", "SLURM_LOCALID": "1"}
    assert runtime.placement(env).rank == 2
    assert runtime.placement(env).local_rank == 0


def test_bad_rank_variable_is_named():
    with pytest.raises(ValueError, match="RANK='x'"):
        runtime.placement({"RANK": "x"})


@pytest.mark.parametrize("env, expected", [
    ({"TRAINING_EXPORTER_RUN": "mine", "TORCHELASTIC_RUN_ID": "te", "SLURM_JOB_ID": "42"}, "mine"),
    ({"TORCHELASTIC_RUN_ID": "te-123", "SLURM_JOB_ID": "42"}, "te-123"),
    ({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "42"}, "42"),
    ({"KUBERNETES_JOB_NAME": "bert-pretrain"}, "bert-pretrain"),
])
def test_run_id_from_scheduler(env, expected):
    assert runtime.resolve_run(None, env) == expected


def test_explicit_run_wins():
    assert runtime.resolve_run("given", {"SLURM_JOB_ID": "42"}) == "given"


def test_generated_run_id_warns():
    with pytest.warns(RuntimeWarning, match="pass TrainingExporter\\(run=...\\)"):
        run = runtime.resolve_run(None, {"TORCHELASTIC_RUN_ID": "none"})
    assert run.startswith("run-")


@pytest.mark.parametrize("bad", ["", "  ", 3])
def test_bad_run_id(bad):
    with pytest.raises(ValueError, match="run must be a non-empty string"):
        runtime.resolve_run(bad, {})


def test_port_default_offset_by_local_rank():
    assert runtime.resolve_port(None, 0, {}) == runtime.DEFAULT_PORT
    assert runtime.resolve_port(None, 3, {}) == runtime.DEFAULT_PORT + 3
    assert runtime.resolve_port(None, 2, {"TRAINING_EXPORTER_PORT": "9100"}) == 9102


def test_explicit_port_is_not_offset():
    assert runtime.resolve_port(9000, 3, {"TRAINING_EXPORTER_PORT": "9100"}) == 9000
    assert runtime.resolve_port(0, 3, {}) == 0


@pytest.mark.parametrize("bad", [-1, 70000, "9000", True])
def test_bad_port(bad):
    with pytest.raises(ValueError, match="port must be an integer"):
        runtime.resolve_port(bad, 0, {})


def test_addr_from_environment():
    assert runtime.resolve_addr(None, {}) == "0.0.0.0"
    assert runtime.resolve_addr(None, {"TRAINING_EXPORTER_ADDR": "127.0.0.1"}) == "127.0.0.1"
    assert runtime.resolve_addr("::1", {"TRAINING_EXPORTER_ADDR": "127.0.0.1"}) == "::1"
