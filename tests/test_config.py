import pytest

from metafleet.common.config import RunConfig
from metafleet.common.errors import ConfigError


def test_defaults_resolve_per_dataset_and_algorithm():
    config = RunConfig.resolve(dataset="watch", algorithm="maml")
    assert (config.clients, config.held_out_clients, config.training_clients) == (10, 2, 8)
    assert config.outer_optimizer == "adam"
    assert config.eval_steps[0] == 0


def test_round_trips_through_json_dict_and_flower_run_config():
    config = RunConfig.resolve(dataset="sinusoid", algorithm="fomaml", rounds=7, eval_steps="0,2,4")
    assert config.eval_steps == (0, 2, 4)
    assert RunConfig.from_dict(config.to_dict()) == config
    flat = config.to_run_config()
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert RunConfig.from_run_config(flat) == config


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("inner_lr", -0.1, "must be a finite number > 0"),
        ("adapt_lr", float("inf"), "must be 0 \\(the same as inner_lr\\) or a finite number > 0"),
        ("outer_lr", float("nan"), "must be a finite number > 0"),
        ("rounds", 0, "must be >= 1"),
        ("rounds", "ten", "must be of type int"),
        ("secure_aggregation", "yes", "must be of type bool"),
        ("dataset", "mnist", "must be one of"),
        ("algorithm", "sgd", "must be one of"),
        ("outer_optimizer", "rmsprop", "must be one of"),
        ("clients_per_round", 500, "the number of training clients"),
        ("held_out_clients", 200, "must be in \\[1, clients\\)"),
        ("eval_steps", "1,5", "starting at 0"),
        ("eval_steps", "0,x", "comma-separated integers"),
        ("frobnicate", 1, "is not a known config field"),
        ("ways", 1, "0 \\(all classes\\) or >= 2"),
        ("fold", 10, "must be in \\[0, 10\\)"),
        ("seed", -5, "no negative seed"),
    ],
)
def test_bad_value_names_field_and_value(field, value, message):
    with pytest.raises(ConfigError, match=message) as caught:
        RunConfig.resolve(**{"dataset": "sinusoid", field: value})
    assert caught.value.field == field
    assert f"config field '{field}'" in str(caught.value)
    assert repr(value) in str(caught.value) or field == "eval_steps"


def test_fedavg_fine_tunes_with_its_own_lr_where_a_dataset_has_one_and_old_runs_keep_inner_lr():
    from metafleet.common.task import load_task
    from metafleet.common.tasks import BUILTIN_TASKS

    DATASET_DEFAULTS = {name: load_task(name).defaults for name in BUILTIN_TASKS}  # noqa: N806
    tuned = [name for name, defaults in DATASET_DEFAULTS.items() if defaults.finetune_lr]
    assert tuned  # the benchmark's fedavg+ft rows rely on these
    for dataset in tuned:
        fedavg = RunConfig.resolve(dataset=dataset, algorithm="fedavg")
        assert fedavg.adaptation_lr == DATASET_DEFAULTS[dataset].finetune_lr != fedavg.inner_lr
        reptile = RunConfig.resolve(dataset=dataset, algorithm="reptile")  # adapts as it was meta-trained to
        assert reptile.adaptation_lr == reptile.inner_lr
        assert RunConfig.resolve(dataset=dataset, algorithm="fedavg", adapt_lr=0.123).adaptation_lr == 0.123
        written_before = {k: v for k, v in fedavg.to_dict().items() if k != "adapt_lr"}
        assert RunConfig.from_dict(written_before).adaptation_lr == fedavg.inner_lr
        assert RunConfig.from_dict(fedavg.to_dict()) == fedavg


def test_per_fedavg_trains_at_its_own_step_where_a_task_chose_one():
    from metafleet.common.task import load_task

    sinusoid = load_task("sinusoid").defaults
    assert sinusoid.per_fedavg_inner_lr and sinusoid.per_fedavg_inner_lr != sinusoid.inner_lr
    assert RunConfig.resolve(dataset="sinusoid", algorithm="per-fedavg").inner_lr == sinusoid.per_fedavg_inner_lr
    assert RunConfig.resolve(dataset="sinusoid", algorithm="per-fedavg", inner_lr=0.123).inner_lr == 0.123
    for algorithm in ("fedavg", "reptile", "maml"):  # the others keep the task's inner lr
        assert RunConfig.resolve(dataset="sinusoid", algorithm=algorithm).inner_lr == sinusoid.inner_lr
    watch = load_task("watch").defaults  # no step of its own: the inner lr
    assert RunConfig.resolve(dataset="watch", algorithm="per-fedavg").inner_lr == watch.inner_lr
