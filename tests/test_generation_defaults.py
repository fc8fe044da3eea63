"""A model's own decoding defaults (generation_defaults.json): read with clear errors, written by the training
export, and taken by `pdllm generate` and the server for every setting a request leaves unset."""

from __future__ import annotations

import json
import shutil

import pytest

from pdllm.errors import CheckpointError
from pdllm.models.generation_defaults import FILE, generation_defaults, write_generation_defaults

SHORT = {"gen_length": 8, "block_length": 8, "steps": 8}


@pytest.fixture
def short_answers(tmp_path, tiny_llada):
    """The tiny checkpoint with a file that makes its answers 8 tokens long."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llada, model)
    write_generation_defaults(model, SHORT)
    return model


def test_a_model_without_the_file_has_no_defaults_and_a_written_file_reads_back(tmp_path):
    assert generation_defaults(tmp_path) == {}
    write_generation_defaults(tmp_path, {**SHORT, "threshold": 0.9})
    assert generation_defaults(tmp_path) == {**SHORT, "threshold": 0.9}
    with pytest.raises(ValueError, match="max_new_tokens"):
        write_generation_defaults(tmp_path, {"max_new_tokens": 8})


@pytest.mark.parametrize(
    "text, message",
    [('{"gen_lenght": 8}', r"unknown key\(s\) gen_lenght"), ("[8]", "JSON object"), ("{", "valid JSON")],
)
def test_a_bad_file_is_an_error_naming_it(tmp_path, text, message):
    (tmp_path / FILE).write_text(text)
    with pytest.raises(CheckpointError, match=message) as err:
        generation_defaults(tmp_path)
    assert FILE in str(err.value)


def _generate(capsys, *args: str) -> dict:
    from pdllm.cli import main

    argv = ["generate", "--in-process", "--context", "The vault code is 4471-KESTREL.", "--question", "The code?"]
    assert main([*argv, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)["stats"]


def _answer_span(stats: dict) -> int:
    """The generated span a decode step attended to: what it read beyond the selected context and the question."""
    return stats["kv_tokens_per_step"] - stats["selected_tokens"] - stats["question_tokens"]


def test_generate_decodes_plain_input_with_the_models_defaults_and_flags_win(capsys, short_answers, tiny_llada):
    assert _answer_span(_generate(capsys, "--model", str(tiny_llada))) == 64  # no file: the built-in default
    assert _answer_span(_generate(capsys, "--model", str(short_answers))) == 8
    given = _generate(capsys, "--model", str(short_answers), "--gen-length", "16", "--block-length", "16")
    assert _answer_span(given) == 16
    # one decoding flag given: the model's recipe steps aside whole (its 8-token block would not divide 32)
    assert _answer_span(_generate(capsys, "--model", str(short_answers), "--gen-length", "32")) == 32


def test_a_request_that_sets_any_decoding_key_gets_none_of_the_models():
    from pdllm.models.generation_defaults import request_defaults

    backend = {"mode": "sparse", "top_k": 2, **SHORT, "threshold": 0.9}
    assert request_defaults({}, backend) == backend
    assert request_defaults({"top_k": 4}, backend) == backend  # not a decoding key
    for key in ("gen_length", "block_length", "steps", "threshold"):
        assert request_defaults({key: 1}, backend) == {"mode": "sparse", "top_k": 2}, key
    assert request_defaults({"threshold": None}, backend) == backend  # unset, as the wire sends it


def test_the_in_process_server_backend_fills_unset_params_from_the_model(short_answers):
    from pdllm.cluster.api.in_process import InProcessBackend

    backend = InProcessBackend.from_directory(str(short_answers))
    try:
        assert backend.model_info()["defaults"] == SHORT  # what the gRPC and HTTP servers put under each request
        out = backend.generate("The vault code is 4471-KESTREL.", "The code?", {"mode": "sparse"}, "r1")
        assert _answer_span(out["stats"]) == 8
        asked = {"mode": "sparse", "gen_length": 32, "steps": 32}  # the README's client example
        assert _answer_span(backend.generate("The code is 4471.", "The code?", asked, "r2")["stats"]) == 32
    finally:
        backend.close()


def test_the_bundled_model_ships_the_answer_span_it_was_trained_on():
    from pdllm.assets import default_model_dir
    from pdllm.training.train import trained_generation

    assert generation_defaults(default_model_dir()) == trained_generation() == {
        "gen_length": 48, "block_length": 48, "steps": 48, "threshold": 0.9}  # fmt: skip
