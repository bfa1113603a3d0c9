"""Every setting is declared once (`server.config`): the flags of `taskmoe serve` and `taskmoe route`, their
environment variables and their defaults all come from the settings models, and nothing else defines
them."""

from __future__ import annotations

import argparse

import pytest

from server.cli import build_parser, serve_config
from server.config import ConfigError, RoutingPolicy, ServerConfig, load_config, settings_rows, shown_default
from server.routing import Router

from conftest import DEMO_MOE


def _options(command: str) -> dict[str, argparse.Action]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {option: action for action in subparsers.choices[command]._actions for option in action.option_strings}


def test_every_server_setting_is_a_serve_flag_with_its_default_in_the_help() -> None:
    options = _options("serve")
    for name, field in ServerConfig.model_fields.items():
        action = options[f"--{name.replace('_', '-')}"]
        assert action.dest == name and action.default is argparse.SUPPRESS  # the environment and defaults apply
        default = shown_default(field)
        assert default is None or f"(default {default})" in action.help, name
    assert {option for option in options if option.startswith("--")} - {"--help"} == {
        f"--{name.replace('_', '-')}" for name in ServerConfig.model_fields
    }


def test_every_variable_is_read_and_a_flag_wins_over_it(monkeypatch) -> None:
    values = {"cache_budget": ("8GiB", 8 * 2**30), "route_union": ("3", 3), "max_prefill_tokens": ("none", None)}
    values |= {
        "expert_pool": ("false", False),
        "upstream": ("a=http://h/v1,b=http://h/v1", ("a=http://h/v1", "b=http://h/v1")),
    }
    for name, (text, _) in values.items():
        monkeypatch.setenv(f"TASKMOE_{name.upper()}", text)
    monkeypatch.setenv("TASKMOE_MODEL", str(DEMO_MOE))
    config = serve_config(build_parser().parse_args(["serve"]))
    assert {name: getattr(config, name) for name in values} == {name: value for name, (_, value) in values.items()}
    flagged = serve_config(build_parser().parse_args(["serve", "--route-union", "1", "--upstream", "c=http://h/v1"]))
    assert flagged.route_union == 1 and flagged.upstream == ("c=http://h/v1",)


def test_routing_defaults_are_the_policys_everywhere() -> None:
    """`taskmoe serve --route-*`, `taskmoe route` and the router take their defaults from one `RoutingPolicy`."""
    policy = RoutingPolicy()
    config = load_config(model=DEMO_MOE)
    assert config.routing == policy
    for name, field in RoutingPolicy.model_fields.items():
        served = ServerConfig.model_fields.get(f"route_{name}")
        if served is not None:
            assert (served.default, served.metadata, served.description) == (
                field.default,
                field.metadata,
                field.description,
            )
    options = _options("route")
    assert {"--rule", "--threshold", "--union", "--novelty", "--neighbours", "-k"} <= set(options)
    assert Router(store=None, embedder=None).policy == policy  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"cache_budget": "0"}, "--cache-budget (TASKMOE_CACHE_BUDGET)"),
        ({"route_threshold": "1.5"}, "--route-threshold (TASKMOE_ROUTE_THRESHOLD)"),
        ({"route_rule": "knn"}, "--route-rule"),
        ({"route_ngram_gate": "0"}, "--route-ngram-gate (TASKMOE_ROUTE_NGRAM_GATE)"),
        ({"port": "70000"}, "--port"),
        ({"max_batch": "0"}, "--max-batch"),
        ({"cache_budget": "4 parsecs"}, "invalid size"),
        ({"metrics_public": "false"}, "needs an --api-key"),
        ({"upstream": "sort"}, "expected PATTERN=http"),
    ],
)
def test_bad_settings_are_one_clear_line_naming_the_flag_and_variable(settings, named) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")) as refused:
        load_config(model=DEMO_MOE, **settings)
    assert "\n" not in str(refused.value) and "validation error" not in str(refused.value)


def test_the_settings_table_has_a_row_per_setting() -> None:
    rows = settings_rows()
    assert [row[0] for row in rows] == [f"--{name.replace('_', '-')}" for name in ServerConfig.model_fields]
    assert rows[[r[0] for r in rows].index("--cache-budget")][:3] == ("--cache-budget", "TASKMOE_CACHE_BUDGET", "4GiB")
