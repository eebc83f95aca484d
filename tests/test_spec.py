"""The job spec refuses bad input with one line naming the field, and accepts good input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.core.spec import JobSpec, SpecError, SpecLimits, parse_spec

LIMITS = SpecLimits(max_width=256, max_height=256, max_frames=33, max_steps=20, max_prompt_chars=50)


def test_valid_spec_uses_defaults() -> None:
    spec = parse_spec({"prompt": "a fox"}, SpecLimits(), {"width": 64, "height": 64})
    assert (spec.width, spec.height, spec.frames) == (64, 64, 81)
    assert spec.codec.name == "h264"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"prompt": "x", "width": 70}, "width: must be a multiple of 16"),
        ({"prompt": "x", "height": 8}, "height"),
        ({"prompt": "x", "width": 512}, "width: 512 is over this farm's maximum 256"),
        ({"prompt": "x", "frames": 18}, "frames: must be 4k+1"),
        ({"prompt": "x", "frames": 37}, "frames: 37 is over this farm's maximum 33"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "steps": 21}, "steps: 21 is over"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt: must contain text"),
        ({"prompt": "y" * 51}, "prompt: 51 characters is over the maximum 50"),
        ({"prompt": "x", "colour": "red"}, "colour: unknown field"),
        ({"prompt": "x", "codec": {"name": "gif"}}, "codec.name"),
        ({"prompt": "x", "output_prefix": "../etc"}, "output_prefix"),
        ({}, "prompt: Field required"),
        ({"prompt": "x", "cache": {"method": "teacache"}}, "cache.method: Input should be 'first_block'"),
        ({"prompt": "x", "cache": {"method": "first_block", "threshold": 0}}, "cache.threshold"),
        ({"prompt": "x", "cache": {"method": "first_block", "threshold": 1.5}}, "cache.threshold"),
        ({"prompt": "x", "cache": {"method": "first_block", "every": 2}}, "cache.every: unknown field"),
    ],
)
def test_bad_specs_are_refused_in_one_line(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(raw, LIMITS)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message
    assert message.startswith("invalid job spec: ")


def test_cache_is_off_by_default_and_kept_when_asked() -> None:
    assert parse_spec({"prompt": "x"}, SpecLimits()).cache is None
    spec = parse_spec({"prompt": "x", "cache": {"method": "first_block", "threshold": 0.1}}, SpecLimits())
    assert spec.cache is not None and (spec.cache.method, spec.cache.threshold) == ("first_block", 0.1)
    assert JobSpec.model_validate_json(spec.to_json()) == spec


@given(st.dictionaries(st.text(max_size=12), st.one_of(st.integers(), st.text(max_size=20), st.none(), st.floats())))
def test_arbitrary_input_is_either_a_spec_or_a_spec_error(raw: dict[str, object]) -> None:
    try:
        spec = parse_spec(raw, LIMITS)
    except SpecError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(spec, JobSpec)
