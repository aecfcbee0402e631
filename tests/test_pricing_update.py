"""LiteLLM's unit prices read into the table, and `meterline pricing update FILE`: a newer
LiteLLM price map merged into the one the daemon reads, with what changed printed."""

import json
from pathlib import Path
from typing import Any

import pytest

from meterline.cli import main
from meterline.config import convert
from meterline.processors.cost import CostConfig, CostProcessor, updated_prices
from meterline.processors.cost.prices import litellm_layer
from tests.helpers import make_context, make_event

UNITS_MAP = {
    "acme-whisper": {"litellm_provider": "openai", "mode": "audio_transcription",
                     "input_cost_per_second": 0.0001},
    "acme-tts": {"litellm_provider": "openai", "mode": "audio_speech",
                 "input_cost_per_character": 1.5e-05},
    "standard/1024-x-1792/acme-dalle": {"litellm_provider": "openai", "mode": "image_generation",
                                        "input_cost_per_pixel": 4.359e-08,
                                        "output_cost_per_pixel": 0.0},
    "acme-dalle": {"litellm_provider": "openai", "mode": "image_generation",
                   "output_cost_per_image": 0.04},
    "vertex_ai/acme-veo": {"litellm_provider": "vertex_ai-video-models",
                           "mode": "video_generation", "output_cost_per_video_per_second": 0.5},
    "cohere/acme-rerank": {"litellm_provider": "cohere", "mode": "rerank",
                           "input_cost_per_query": 0.002},
    "acme-search-chat": {"litellm_provider": "openai", "mode": "chat",
                         "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                         "search_context_cost_per_query": {
                             "search_context_size_low": 0.03,
                             "search_context_size_medium": 0.035}},
    "vertex_ai/acme-gemini": {"litellm_provider": "vertex_ai-language-models", "mode": "chat",
                              "input_cost_per_token": 1e-06, "input_cost_per_character": 2.5e-07},
}


def units_of(key: str, provider: str | None = "openai") -> dict[str, Any]:
    price = litellm_layer(UNITS_MAP, "m.json").by_provider[(provider, key)]
    return price.units.as_spec() if price.units else {}


@pytest.mark.parametrize(("model", "provider", "units"), [
    ("acme-whisper", "openai", {"audio_input_minute": 0.006}),
    ("acme-tts", "openai", {"characters": 15.0}),
    ("acme-dalle", "openai", {"image": 0.04, "images": {"1024x1792/standard": 0.08}}),
    ("acme-veo", "gcp.vertex_ai", {"video_second": 0.5}),
    ("acme-rerank", "cohere", {"searches": 2.0}),
    ("acme-search-chat", "openai", {"searches": 35.0}),
    ("acme-gemini", "gcp.vertex_ai", {}),  # a chat model's per-character price is not speech
])
def test_litellm_unit_prices_map_onto_the_same_units(
        model: str, provider: str, units: dict[str, Any]) -> None:
    found = units_of(model, provider)
    assert found.keys() == units.keys()
    for name, value in units.items():
        if isinstance(value, dict):
            assert found[name] == pytest.approx(value, rel=1e-3)  # (per pixel)
        else:
            assert found[name] == pytest.approx(value)


def test_a_litellm_map_prices_a_transcription_per_second(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(UNITS_MAP))
    config = convert({"price_files": [str(path)]}, CostConfig)
    e = CostProcessor(config, make_context(tmp_path, "cost")).process([make_event(
        request_model="acme-whisper", input_tokens=None, output_tokens=None,
        audio_input_seconds=30)])[0]
    assert e.cost_usd == pytest.approx(30 * 0.0001)


OLD = {"sample_spec": {"input_cost_per_token": 0.0},
       "m-kept": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-06},
       "m-changed": {"litellm_provider": "openai", "mode": "chat",
                     "input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06},
       "m-same": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 3e-06,
                  "max_tokens": 100}}
NEW = {"m-changed": {"litellm_provider": "openai", "mode": "chat",
                     "input_cost_per_token": 1.5e-06, "output_cost_per_token": 8e-06},
       "m-same": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 3e-06,
                  "max_tokens": 200},
       "m-added": {"litellm_provider": "groq", "mode": "audio_transcription",
                   "input_cost_per_second": 3e-05}}


def write(path: Path, data: Any) -> str:
    path.write_text(json.dumps(data, indent=2))
    return str(path)


def test_pricing_update_merges_into_the_data_dir_and_prints_what_changed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no pipeline.yaml: the data dir is ./data
    target = updated_prices(tmp_path / "data")
    target.parent.mkdir(parents=True)
    write(target, OLD)
    assert main(["pricing", "update", write(tmp_path / "new.json", NEW)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        "added    m-added  (groq, audio_transcription)",
        "changed  m-changed  input_cost_per_token 2e-06 -> 1.5e-06"]
    assert out[2].startswith("1 added, 1 changed, 0 removed, 1 kept (not in ")
    assert "--prune removes them), 1 unchanged; wrote data/prices/litellm.json" in out[2]
    merged = json.loads(target.read_text())
    assert set(merged) == {"sample_spec", "m-kept", "m-changed", "m-same", "m-added"}
    assert merged["m-changed"]["input_cost_per_token"] == 1.5e-06


def test_pricing_update_with_prune_removes_the_models_the_new_map_lacks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "prices.json"
    write(target, OLD)
    assert main(["pricing", "update", write(tmp_path / "new.json", NEW), "--into",
                 str(target), "--prune"]) == 0
    out = capsys.readouterr().out
    assert "removed  m-kept" in out and "1 removed, 0 kept" in out
    assert "m-kept" not in json.loads(target.read_text())


def test_pricing_update_dry_run_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "prices.json"
    write(target, OLD)
    before = target.read_text()
    assert main(["pricing", "update", write(tmp_path / "new.json", NEW), "--into",
                 str(target), "--dry-run"]) == 0
    assert "would write" in capsys.readouterr().out
    assert target.read_text() == before


@pytest.mark.parametrize(("text", "message"), [
    ('{\n  "m": {\n    "input_cost_per_token": 1e-06,\n  }\n}',
     "new.json:4: not valid JSON"),
    ('{\n  "m-ok": {"input_cost_per_token": 1e-06},\n  "m-bad": [1, 2]\n}',
     "new.json:3: m-bad: expected an object, got list"),
    ('{\n  "m": {\n    "litellm_provider": "openai",\n    "output_cost_per_token": "cheap"\n'
     '  }\n}', "new.json:4: m.output_cost_per_token: expected a finite non-negative "
               "number, got 'cheap'"),
    ('{"m": {"input_cost_per_token": -1e-06}}',
     "new.json:1: m.input_cost_per_token: expected a finite non-negative number"),
    ('{"m": {"input_cost_per_token": 1e400}}',
     "new.json:1: m.input_cost_per_token: expected a finite non-negative number, got inf"),
    ('{"m": {"input_cost_per_token": NaN}}',
     "new.json:1: m.input_cost_per_token: expected a finite non-negative number, got nan"),
    ('{"m": {"input_cost_per_token": 1' + "0" * 400 + '}}',
     "new.json:1: m.input_cost_per_token: expected a finite non-negative number, got 1000"),
    ('{"m": ' + "[" * 5000 + "]" * 5000 + "}", "new.json: JSON nested too deeply"),
])
def test_pricing_update_refuses_a_malformed_map_naming_the_line_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    target = tmp_path / "prices.json"
    write(target, OLD)
    before = target.read_text()
    (tmp_path / "new.json").write_text(text)
    assert main(["pricing", "update", str(tmp_path / "new.json"), "--into", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("refused: ") and message in err
    assert target.read_text() == before


def test_the_cost_processor_reads_the_updated_map_from_its_data_dir(tmp_path: Path) -> None:
    write(updated_prices(tmp_path).parent.mkdir(parents=True) or updated_prices(tmp_path),
          {"acme-new-1": {"litellm_provider": "openai", "mode": "chat",
                          "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}})
    e = CostProcessor(CostConfig(), make_context(tmp_path, "cost")).process([make_event(
        request_model="acme-new-1", input_tokens=1000, output_tokens=1000)])[0]
    assert e.cost_usd == pytest.approx(3000 / 1e6)
    assert e.pricing_ref == "openai/acme-new-1@litellm.json"


def test_pricing_shows_an_entrys_unit_prices(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["pricing", "whisper-1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["units_usd"], out["tokens_priced"]) == ({"audio_input_minute": 0.006}, False)
