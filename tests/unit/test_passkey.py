import pytest

from kvbench.errors import KVBenchError
from kvbench.tasks import build
from kvbench.tasks.synthetic import INTRO, NEEDLE, QUESTION, first_number


def test_samples_are_seeded_sized_and_hold_the_needle(tiny_gqa):
    _, tok = tiny_gqa
    task = build({"name": "passkey", "num_samples": 6, "context_tokens": 900, "seed": 3})
    samples = task.samples(tok)
    again = build({"name": "passkey", "num_samples": 9, "context_tokens": 900, "seed": 3}).samples(tok)
    assert samples == again[:6]  # sample i does not depend on how many are asked for
    other = build({"name": "passkey", "num_samples": 6, "context_tokens": 900, "seed": 4}).samples(tok)
    assert [s["answer"] for s in samples] != [s["answer"] for s in other]
    for s in samples:
        n = len(tok(s["prompt"]).input_ids)
        assert 900 - 60 < n <= 900
        assert NEEDLE.format(key=s["answer"]) in s["prompt"]
        assert len(s["answer"]) == 5 and len(set(s["answer"])) == 5 and s["answer"][0] != "0"  # distinct digits
        needle = NEEDLE.format(key=s["answer"])
        filler = len(s["prompt"]) - len(INTRO) - len(needle) - len(QUESTION)
        before = s["prompt"].index(needle) - len(INTRO)
        assert before / filler == pytest.approx(s["depth"], abs=0.08)  # depth is a fraction of the filler


def test_scoring():
    assert first_number(" 12345. The pass key") == "12345"
    assert first_number("none") is None
    task = build({"name": "passkey"})
    assert task.score([{"score": 1.0}, {"score": 0.0}, {"score": 1.0}]) == {"passkey": 66.67}


def test_bad_task_settings():
    with pytest.raises(KVBenchError, match="unknown task 'nope'; choose one of: longbench, longbench_v2, math, multikey, niah, passkey, perplexity, ruler"):
        build({"name": "nope"})
    with pytest.raises(KVBenchError, match="has no setting context_len"):
        build({"name": "passkey", "context_len": 5})
    with pytest.raises(KVBenchError):
        build({"name": "passkey", "depth_min": 0.8, "depth_max": 0.2})


def test_multikey_samples(tiny_gqa):
    from kvbench.tasks.synthetic import MULTI_NEEDLE

    _, tok = tiny_gqa
    task = build({"name": "multikey", "num_samples": 4, "context_tokens": 700, "num_keys": 3})
    for s in task.samples(tok):
        assert 640 < len(tok(s["prompt"]).input_ids) <= 700
        assert s["prompt"].count("The key for the ") == 4  # three needles and the question
        asked = s["prompt"].rsplit("What is the key for the ", 1)[1].split("?")[0]
        assert MULTI_NEEDLE.format(name=asked, key=s["answer"]) in s["prompt"]


def test_training_documents_have_exact_length_and_answer():
    import random

    from kvbench.tasks.synthetic import training_document

    for kind in ("passkey", "multikey", "copy", "repeat", "text"):
        for n in (159, 320, 1000, 1279):
            text, answer_at = training_document(kind, random.Random(n), n)
            assert len(text) == n and text.isascii()
            if kind in ("passkey", "multikey"):
                assert text[answer_at:].strip(" .").isdigit() and text[:answer_at].endswith(" is")
            if kind == "copy":  # the answer repeats the bracketed string that appeared earlier
                answer = text[answer_at - 1 :]
                assert answer.startswith("[") and answer.endswith("]") and text.count(answer) == 2


def test_synthetic_task_names_compose_to_the_synthetic_tasks():
    from hydra import compose, initialize_config_dir

    from kvbench.resources import CONFIG_DIR

    expected = {"synthetic_passkey": "passkey", "synthetic_multikey": "multikey", "synthetic_ppl": "perplexity"}
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for alias, name in expected.items():
            assert compose("config", overrides=[f"task={alias}"]).task.name == name


def test_keys_may_repeat_digits_when_asked(tiny_gqa):
    from kvbench.errors import KVBenchError

    _, tok = tiny_gqa
    task = build({"name": "passkey", "num_samples": 40, "context_tokens": 300, "distinct_digits": False})
    assert any(len(set(s["answer"])) < 5 for s in task.samples(tok))
    with pytest.raises(KVBenchError, match="task.distinct_digits=false"):
        build({"name": "passkey", "digits": 11})


@pytest.mark.parametrize("chat", [True, False])
def test_chat_switch_decides_whether_the_prompt_is_wrapped(tiny_gqa, chat):
    """task.chat=false: a plain completion of the prompt, as the passkey papers prompt base models."""
    from kvbench.methods import build as build_method
    from kvbench.models.generator import Generator

    model, tok = tiny_gqa
    task = build({"name": "passkey", "num_samples": 1, "context_tokens": 300, "chat": chat, "max_new_tokens": 2})
    sample = task.samples(tok)[0]
    gen = Generator(model, tok, build_method({"name": "full"}), None, chat_format="llama2")
    seen = []
    encode = gen.encode
    gen.encode = lambda text: seen.append(text) or encode(text)
    task.evaluate(sample, gen)
    assert (seen[0] == sample["prompt"]) is not chat and sample["prompt"] in seen[0]
