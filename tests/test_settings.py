"""Typed settings: defaults work, bad values are rejected with the field and the reason."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from stream_influence.core.settings import (
    CurvatureSettings,
    EngineSettings,
    PolicySettings,
    SchemaSettings,
)


def test_negative_damping_rejected_with_field_and_reason() -> None:
    with pytest.raises(ValidationError) as info:
        EngineSettings.model_validate({"curvature": {"damping": -0.5}})
    errors = info.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == ("curvature", "damping")
    assert errors[0]["type"] == "greater_than"
    text = str(info.value)
    assert "curvature.damping" in text and "greater than 0" in text


def test_zero_damping_also_rejected() -> None:
    with pytest.raises(ValidationError, match="damping"):
        CurvatureSettings(damping=0.0)


def test_accept_threshold_above_quarantine_threshold_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        PolicySettings(accept_threshold=0.5, quarantine_threshold=0.1)
    text = str(info.value)
    assert "accept_threshold (0.5) must be ≤ quarantine_threshold (0.1)" in text
    with pytest.raises(ValidationError) as info:
        EngineSettings.model_validate({"policy": {"accept_threshold": 0.3}})  # default τ_q = 0.02
    assert info.value.errors()[0]["loc"] == ("policy",)
    PolicySettings(accept_threshold=0.1, quarantine_threshold=0.1)  # equal is fine


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"curvature": {"forgetting": 1.5}}, ("curvature", "forgetting")),
        ({"curvature": {"kind": "full"}}, ("curvature", "kind")),
        ({"policy": {"max_quarantine_rate": 0}}, ("policy", "max_quarantine_rate")),
        ({"learner": {"learning_rate": -1}}, ("learner", "learning_rate")),
        ({"schema": {"classes": ["a"]}}, ("schema",)),
        ({"schema": {"classes": [1, "1"]}}, ("schema",)),
        ({"curvature": {"dampnig": 0.1}}, ("curvature", "dampnig")),  # typo: extra fields forbidden
    ],
)
def test_other_invalid_values_name_their_field(data: dict, loc: tuple) -> None:
    with pytest.raises(ValidationError) as info:
        EngineSettings.model_validate(data)
    assert info.value.errors()[0]["loc"] == loc


def test_defaults_and_schema_alias_round_trip() -> None:
    s = EngineSettings()
    assert s.curvature.kind == "kfac" and s.curvature.damping == 0.1
    assert s.policy.score == "cosine_influence" and s.policy.mode == "calibrated"
    assert s.policy.quarantine_threshold == 0.0  # the floor: never quarantine a helpful event
    dumped = s.model_dump(mode="json", by_alias=True)
    assert "schema" in dumped and "schema_" not in dumped
    custom = EngineSettings(schema=SchemaSettings(classes=["x", "y"]))
    again = EngineSettings.model_validate(custom.model_dump(mode="json", by_alias=True))
    assert again == custom and again.schema_.classes == ["x", "y"]
    with pytest.raises(ValidationError):
        s.curvature.damping = 1.0  # type: ignore[misc]  # frozen
