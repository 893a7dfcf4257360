"""The stage table is the one place a stage is declared: a toy stage added as one record is checked
by ``config.check``, run by ``launch`` (without Ray, as its record says), accepted by
``cerbero-submit``'s CLI, run by the main job in its place (after evaluate) with its check told
which stages ran before it, and given a layer by the import-layer test."""

from dataclasses import dataclass, field

import pytest

from cerbero_ray.config import check, compose
from cerbero_ray.config.common import ClusterConfig, PathsConfig, TokenizerConfig
from cerbero_ray.config.stages import STAGES, Stage, recipe_stages, register
from conftest import PATHS

SEEN = []


@dataclass
class ToyStageConfig:  # sections the main job's config has: the recipe can run it
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


def check_toy(c: ToyStageConfig, before: frozenset = frozenset()) -> None:
    if c.cluster.namespace == "no-toys":
        raise ValueError("cluster.namespace: no toys in this one")
    SEEN.append(("check", sorted(before)))


def run_toy(c: ToyStageConfig) -> dict:
    c = check("toy", c)  # what every run_<stage> does: a no-op once checked
    SEEN.append(("run", type(c).__name__))
    return {"toy": c.tokenizer.assistant_tag}


TOY = Stage("toy", ToyStageConfig, check_toy, "test_stages:run_toy", False, "the same command plays again", recipe=6)


@pytest.fixture
def toy():
    SEEN.clear()
    register(TOY)
    yield TOY
    del STAGES["toy"]


def test_a_toy_stage_is_one_record(toy):
    from test_layers import layers

    from cerbero_ray import submit
    from cerbero_ray.recipe import run_recipe
    from cerbero_ray.runtime import launch

    with pytest.raises(ValueError, match="cluster.namespace: no toys in this one"):
        check("toy", {"paths": PATHS, "cluster": {"namespace": "no-toys"}})
    with pytest.raises(ValueError, match="cluster.num_cpus must be >= 1"):  # every stage's cluster check first
        check("toy", {"paths": PATHS, "cluster": {"num_cpus": 0}})
    assert launch("toy", {"paths": PATHS}) == {"toy": "AI"}  # no Ray: its record says so
    assert SEEN == [("check", []), ("run", "ToyStageConfig")]
    assert submit.parser().parse_args(["toy", "a=1"]).stage == "toy"
    assert recipe_stages()[-2:] == ["evaluate", "toy"] and layers()["test_stages"] == 5
    SEEN.clear()
    c = check("recipe", compose("recipe", ["stages=[toy,train]"]))
    assert c.stages == ["train", "toy"]  # the recipe's order, whatever the list's
    assert SEEN == [("check", ["train"])]
    SEEN.clear()
    assert run_recipe(compose("recipe", ["stages=[toy]"])) == {"toy": {"toy": "AI"}}
    assert SEEN == [("check", []), ("run", "ToyStageConfig")]


def test_a_stage_declared_twice_is_refused(toy):
    with pytest.raises(ValueError, match="declared twice"):
        register(Stage("toy", ToyStageConfig, check_toy, "test_stages:run_toy", True, "again"))
    assert STAGES["toy"] is TOY


def test_the_recipe_checks_a_checkpoint_only_when_no_earlier_stage_writes_it():
    with pytest.raises(ValueError, match="label.checkpoint"):
        check("recipe", compose("recipe", ["stages=[label]", "label.checkpoint=/not/there"]))
    c = check("recipe", compose("recipe", ["stages=[label,train]", "label.checkpoint=/not/yet"]))
    assert c.stages == ["train", "label"]
    with pytest.raises(ValueError, match="stages: unknown \\['serve'\\]"):
        check("recipe", compose("recipe", ["stages=[serve]"]))
    assert check("recipe", compose("recipe")).stages == ["data", "train", "label", "export", "evaluate"]
