"""The generate loop: streaming, stop strings, limits, errors, the drafter lifecycle and statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VOCAB, IdTokenizer, OracleDrafter, plain_greedy, tiny_model

from restspec.decode import GenerationConfig, SamplingConfig, SpeculativeGenerator
from restspec.decode.generate import limit_depth
from restspec.decode.text import IncrementalDecoder, StopStringMatcher
from restspec.draft.base import Step
from restspec.draft.tree import DraftTree
from restspec.errors import GenerationError

PROMPT = [5, 17, 33, 2, 61, 8]


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def test_incremental_decoding_of_split_multibyte_characters():
    tok = byte_tokenizer()
    text = "héllo 世界 🎉 done"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte: characters are split across tokens
    decoder = IncrementalDecoder(tok, tok("prompt:")["input_ids"])
    pieces = [decoder.push([i]) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[ids.index(tok(" 世")["input_ids"][1])] == ""  # first byte of 世 alone: held back


def test_flush_releases_an_incomplete_character():
    tok = byte_tokenizer()
    decoder = IncrementalDecoder(tok)
    assert decoder.push(tok("ab🎉")["input_ids"][:-1]) == "ab"
    assert decoder.flush() == "\ufffd"


def test_stop_string_matcher():
    stops = StopStringMatcher(["\n\n", "END"])
    assert stops.find("abc\n\nd", 0) == 3
    assert stops.find("xxEN", 0) == -1
    assert stops.find("xxEND and \n\n", 0) == 2  # the earliest wins
    assert stops.holdback("text E") == 1  # "E" may grow into "END"
    assert stops.holdback("text EN") == 2
    assert stops.holdback("text\n") == 1
    assert stops.holdback("text") == 0


def test_limit_depth_keeps_a_prefix_closed_tree():
    # root ─┬─ 0 ── 2 ── 3
    #       └─ 1 ── 4
    tree = DraftTree(np.array([7, 8, 9, 10, 11]), np.array([-1, -1, 0, 2, 1]))
    cut = limit_depth(tree, 2)
    assert cut.tokens.tolist() == [7, 8, 9, 11]
    assert cut.parents.tolist() == [-1, -1, 0, 1]
    assert len(limit_depth(tree, 0)) == 0
    assert limit_depth(tree, 3) is tree


def test_stream_chunks_add_up_to_the_result():
    model = tiny_model("llama")
    truth = PROMPT + plain_greedy(model, PROMPT, 30)
    gen = SpeculativeGenerator(model, IdTokenizer(), OracleDrafter(truth, "mixed", VOCAB), budget=8)
    chunks = list(gen.stream(PROMPT, GenerationConfig(max_new_tokens=30)))
    result = chunks[-1].result
    assert result is not None and all(c.result is None for c in chunks[:-1])
    assert np.concatenate([c.token_ids for c in chunks]).tolist() == result.output_ids.tolist()
    assert "".join(c.text for c in chunks) == result.text == IdTokenizer().decode(truth[len(PROMPT) :])
    assert len(chunks) == len(result.steps)
    assert result.mean_accepted == pytest.approx(30 / len(result.steps))
    assert result.tokens_per_s > 0 and result.elapsed_s >= result.prefill_s > 0
    assert sum(s.emitted for s in result.steps) == 30
    for s in result.steps:
        assert s.accepted <= s.drafted and s.forward_s > 0 and s.accept_s > 0 and s.draft_s >= 0


@pytest.mark.parametrize("mode", ["empty", "chain", "mixed"])
def test_stop_string_cuts_text_and_tokens(mode):
    model = tiny_model("llama")
    out = plain_greedy(model, PROMPT, 30)
    tok = IdTokenizer()
    stop = tok.decode(out[6:8])  # completed by token 7
    first = tok.decode(out).find(stop)
    gen = SpeculativeGenerator(model, tok, OracleDrafter(PROMPT + out, mode, VOCAB), budget=8)
    chunks = list(gen.stream(PROMPT, GenerationConfig(max_new_tokens=30, stop_strings=(stop,))))
    result = chunks[-1].result
    assert result.finish_reason == "stop"
    assert result.text == tok.decode(out)[:first]
    end = next(i for i in range(len(out) + 1) if stop in tok.decode(out[:i]))
    assert result.output_ids.tolist() == out[:end]
    assert "".join(c.text for c in chunks) == result.text
    assert not any(stop in c.text for c in chunks)


def test_plain_loop_is_one_token_per_step():
    model = tiny_model("gpt2")
    result = SpeculativeGenerator(model, IdTokenizer()).generate(PROMPT, GenerationConfig(max_new_tokens=12))
    assert result.output_ids.tolist() == plain_greedy(model, PROMPT, 12)
    assert len(result.steps) == 12 and result.mean_accepted == 1.0
    assert all(s.drafted == 0 and s.accepted == 0 for s in result.steps)


def test_context_limit():
    model = tiny_model("gpt2")  # 256 positions
    gen = SpeculativeGenerator(model, IdTokenizer())
    with pytest.raises(GenerationError, match=r"300 tokens.*context is 256"):
        gen.generate([1] * 300)
    result = gen.generate([1] * 250, GenerationConfig(max_new_tokens=20))
    assert len(result.output_ids) == 6 and result.finish_reason == "length"  # 250 + 6 = 256 positions


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_k": -2}, "top_k=-2"),
        ({"top_k": 2.5}, "top_k=2.5"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_invalid_sampling_values_name_field_and_value(kwargs, field):
    with pytest.raises(GenerationError, match=field):
        SamplingConfig(**kwargs)


def test_invalid_generation_values():
    with pytest.raises(GenerationError, match="max_new_tokens=0"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(GenerationError, match="stop_strings"):
        GenerationConfig(stop_strings=("",))
    assert GenerationConfig(stop_strings="\n").stop_strings == ("\n",)
    gen = SpeculativeGenerator(tiny_model("llama"), IdTokenizer())
    with pytest.raises(GenerationError, match="empty"):
        gen.generate([])
    with pytest.raises(GenerationError, match=f"\\[0, {VOCAB}\\)"):
        gen.generate([1, VOCAB + 3])
    with pytest.raises(GenerationError, match="prompt is NoneType; pass text"):
        gen.generate(None)
    with pytest.raises(GenerationError, match="must be integers, got float64"):
        gen.generate([1.5, 2.0])


class RecordingDrafter:
    def __init__(self, fail_at: int | None = None) -> None:
        self.events: list[str] = []
        self.budgets: list[int] = []
        self.observed: list[Step] = []
        self.fail_at = fail_at

    def start_request(self, prompt, request=0):
        self.events.append(f"start {len(prompt)}")

    def propose(self, context, budget):
        self.budgets.append(budget)
        if self.fail_at is not None and len(self.budgets) == self.fail_at:
            raise RuntimeError("drafter failed")
        return DraftTree(np.array([1, 2, 3]), np.array([-1, -1, 0]))

    def observe(self, step):
        self.observed.append(step)

    def stop_request(self, request=0):
        self.events.append("stop")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        return None


class HalfBudget:
    max_budget = 3

    def __init__(self):
        self.steps: list[Step] = []

    def choose(self, tree, past_len):
        return 2

    def choose_batch(self, trees, fixed_inputs=None, room=None):
        return [2] * len(trees)

    def step_room(self, fixed_inputs):
        return None

    def observe(self, step):
        self.steps.append(step)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        return None


def test_the_policy_and_the_drafter_observe_one_record_per_step():
    policy = HalfBudget()
    drafter = RecordingDrafter()
    generator = SpeculativeGenerator(tiny_model("llama"), IdTokenizer(), drafter, budget=policy)
    result = generator.generate(PROMPT, GenerationConfig(max_new_tokens=5))
    assert len(policy.steps) == len(result.steps)
    assert all(a is b for a, b in zip(policy.steps, drafter.observed, strict=True))
    for step, stats in zip(policy.steps, result.steps, strict=True):
        assert step.width == stats.drafted + 1 and len(step.tree) == stats.drafted
        assert len(step.path) == stats.accepted and len(step.accepted) == stats.emitted
        # the accepted path follows the tree: each node's parent is the node before it
        parents = step.tree.parents[step.path].tolist()
        assert parents == [-1, *step.path.tolist()][: len(step.path)]
        assert step.tree.tokens[step.path].tolist() == step.accepted[: len(step.path)].tolist()
        assert step.forward_s > 0 and step.seconds >= step.forward_s
    assert policy.steps[0].context.tolist() == PROMPT


def test_drafter_lifecycle_observe_and_budget_policy():
    model = tiny_model("llama")
    drafter = RecordingDrafter()
    result = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=HalfBudget()).generate(
        PROMPT, GenerationConfig(max_new_tokens=5)
    )
    assert drafter.events == [f"start {len(PROMPT)}", "stop"]
    assert set(drafter.budgets) == {3}
    assert all(s.drafted == 2 for s in result.steps[:-1])  # the last step may be depth-limited
    logits = drafter.observed[0].logits
    assert logits.input_ids.tolist() == [PROMPT[-1], 1, 2]
    assert logits.logits.shape == (3, VOCAB) and logits.logits.dtype == np.float32
    assert np.concatenate([s.accepted for s in drafter.observed]).tolist() == result.output_ids.tolist()


class OutOfVocabularyDrafter(RecordingDrafter):
    def propose(self, context, budget):
        return DraftTree.chain([VOCAB + 5])


def test_a_draft_outside_the_vocabulary_is_a_clear_error():
    drafter = OutOfVocabularyDrafter()
    gen = SpeculativeGenerator(tiny_model("llama"), IdTokenizer(), drafter, budget=3)
    with pytest.raises(GenerationError, match=f"token {VOCAB + 5} but the model has {VOCAB}"):
        gen.generate(PROMPT)
    assert drafter.events[-1] == "stop"


def test_stop_request_runs_when_a_step_fails():
    drafter = RecordingDrafter(fail_at=2)
    gen = SpeculativeGenerator(tiny_model("llama"), IdTokenizer(), drafter, budget=3)
    with pytest.raises(RuntimeError, match="drafter failed"):
        gen.generate(PROMPT, GenerationConfig(max_new_tokens=5))
    assert drafter.events[-1] == "stop"


def test_text_prompt_and_chat_template():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )  # fmt: skip
    gen = SpeculativeGenerator(LlamaForCausalLM(config).eval(), tok)
    assert gen.encode("hi").tolist() == tok("hi")["input_ids"]
    chat = gen.encode("hi", chat=True)
    assert tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert gen.encode([{"role": "user", "content": "hi"}]).tolist() == chat.tolist()
    with pytest.raises(GenerationError, match="chat=True"):
        gen.encode([1, 2, 3], chat=True)
    result = gen.generate("hi", GenerationConfig(max_new_tokens=4), chat=True)
    assert result.prompt_ids.tolist() == chat.tolist() and len(result.output_ids) <= 4


def test_bfloat16_model_runs_with_a_bfloat16_mask():
    from restspec.decode import model_layout

    model = tiny_model("llama")
    bf16 = type(model)(model.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())
    assert model_layout(bf16).dtype == torch.bfloat16
    out = plain_greedy(bf16, PROMPT, 12)
    gen = SpeculativeGenerator(bf16, IdTokenizer(), OracleDrafter(PROMPT + out, "chain", VOCAB), budget=4)
    result = gen.generate(PROMPT, GenerationConfig(max_new_tokens=12))
    assert len(result.output_ids) == 12 and result.finish_reason == "length"
    assert sum(s.accepted for s in result.steps) > 0
