"""Generation: the cached decoder equals a full forward pass, beam search with one beam equals greedy decoding, wide
beam search equals exhaustive search, and the length / n-gram / top-p settings hold."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.generation import GenerationSettings, beam_search, generate, nucleus_sample
from tests.test_models import SPECIAL, tiny_cfg

EOS, PAD = SPECIAL.sep, SPECIAL.pad


def table_step(table: torch.Tensor):
    """A toy decoder whose next-token logits depend only on the last token: ``table[last_token]`` (V, V). Its cache
    is the sequence so far, so beam reordering of the cache is exercised too."""

    def step(new_ids: torch.Tensor, cache):
        seq = new_ids if cache is None else torch.cat([cache, new_ids], dim=1)
        return table[seq[:, -1]], seq

    return step


def toy_table(vocab: int, fill: float = 0.0) -> torch.Tensor:
    """Logits table with the padding token never generated (so that lengths can be read off the padding)."""
    table = torch.full((vocab, vocab), fill)
    table[:, PAD] = -1e4
    return table


def lengths(tokens: torch.Tensor) -> list[int]:
    return (tokens != PAD).sum(dim=1).tolist()


def caption_model(tmp_path):
    torch.manual_seed(0)
    return create_model("caption", tiny_cfg(tmp_path), special=SPECIAL).eval()


def test_cached_decoding_equals_full_forward(tmp_path):
    model = caption_model(tmp_path)
    image = torch.randn(3, 3, 32, 32)
    ids = torch.randint(5, 60, (3, 9))
    ids[:, 0] = SPECIAL.cls
    with torch.no_grad():
        image_embeds = model.encode_image(image)
        full = model.text_decoder(ids, None, encoder_hidden_states=image_embeds)  # (B, L, V)
        image_kv = model.text_decoder.bert.precompute_image_kv(image_embeds)
        logits, cache = model.decode_step(ids[:, :4], image_kv, None)
        stepped = [logits]
        for t in range(4, 9):
            logits, cache = model.decode_step(ids[:, t:t + 1], image_kv, cache)
            stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, dim=1), full[:, 3:], atol=1e-5, rtol=1e-5)


def test_beam_search_with_one_beam_equals_greedy_decoding(tmp_path):
    """On the caption model: one beam (length_penalty 0, so finished scores compare as raw log-probabilities) gives
    the greedy sequence, computed here without any cache by full forward passes."""
    model = caption_model(tmp_path)
    image = torch.randn(4, 3, 32, 32)
    prompt = torch.tensor([SPECIAL.cls, 10, 11])
    settings = GenerationSettings(num_beams=1, max_length=12, min_length=0, length_penalty=0.0)
    with torch.no_grad():
        beam = model.generate(image, prompt, settings)
        image_embeds = model.encode_image(image)
        seq = prompt[None].expand(4, -1)
        greedy = torch.full((4, 12), PAD)
        finished = torch.zeros(4, dtype=torch.bool)
        for t in range(12):
            token = model.text_decoder(seq, None, encoder_hidden_states=image_embeds)[:, -1].argmax(-1)
            finished |= token == EOS
            greedy[:, t] = token.masked_fill(finished, PAD)
            seq = torch.cat([seq, token[:, None]], dim=1)
    assert torch.equal(beam, greedy)


def test_wide_beam_search_equals_exhaustive_search():
    torch.manual_seed(1)
    vocab, max_length = 6, 3
    table = torch.randn(vocab, vocab) * 2
    table[:, PAD] = -1e4  # keep the toy vocabulary to tokens 1..5 (pad never generated)
    settings = GenerationSettings(num_beams=40, max_length=max_length, min_length=0, length_penalty=0.0)
    tokens, score = beam_search(table_step(table), torch.tensor([[2], [4]]), settings, eos_id=EOS, pad_id=PAD)
    log_probs = F.log_softmax(table, dim=-1)
    for row, start in enumerate((2, 4)):
        best, best_seq = -float("inf"), None
        words = [t for t in range(vocab) if t not in (PAD, EOS)]
        for n in range(max_length + 1):
            for body in itertools.product(words, repeat=n):
                # a sequence that reaches max_length is ended there, without scoring an end token
                path = (start, *body) if n == max_length else (start, *body, EOS)
                value = sum(log_probs[a, b].item() for a, b in itertools.pairwise(path))
                if value > best:
                    best, best_seq = value, list(body)
        assert tokens[row, :len(best_seq)].tolist() == best_seq and lengths(tokens[row:row + 1]) == [len(best_seq)]
        assert score[row].item() == pytest.approx(best, abs=1e-4)


@pytest.mark.parametrize("sample", [False, True])
def test_min_and_max_length_hold(sample):
    vocab = 12
    eager = toy_table(vocab)
    eager[:, EOS] = 20.0  # the end token is by far the likeliest: only min_length keeps sequences going
    never = toy_table(vocab)
    never[:, EOS] = -10.0  # the end token is never chosen: only max_length stops sequences
    prompt = torch.tensor([[2, 7], [2, 9]])
    for table, expected in ((eager, 4), (never, 7)):
        settings = GenerationSettings(num_beams=3, max_length=7, min_length=4, sample=sample)
        tokens = generate(table_step(table), prompt, settings, eos_id=EOS, pad_id=PAD,
                          generator=torch.Generator().manual_seed(0))
        assert tokens.shape == (2, 7)
        assert lengths(tokens) == [expected, expected]
        assert not (tokens == EOS).any()


@pytest.mark.parametrize("sample", [False, True])
def test_no_repeat_ngram_size(sample):
    vocab = 12
    table = toy_table(vocab, -5.0)
    table[7, 8] = table[8, 7] = 5.0  # the decoder loves "7 8 7 8 ..."
    table[:, EOS] = -8.0
    prompt = torch.tensor([[2, 7]])

    def bigrams(row):
        seq = [7, *[t for t in row if t != PAD]]
        return list(itertools.pairwise(seq))

    free = GenerationSettings(num_beams=2, max_length=8, min_length=0, sample=sample, top_p=0.5)
    blocked = GenerationSettings(num_beams=2, max_length=8, min_length=0, sample=sample, top_p=0.5,
                                 no_repeat_ngram_size=2)
    gen = torch.Generator().manual_seed(0)
    repeated = generate(table_step(table), prompt, free, EOS, PAD, generator=gen)[0].tolist()
    assert len(set(bigrams(repeated))) < len(bigrams(repeated))  # without the setting the bigrams repeat
    tokens = generate(table_step(table), prompt, blocked, EOS, PAD, generator=gen)[0].tolist()
    assert len(set(bigrams(tokens))) == len(bigrams(tokens))


def test_repetition_penalty_changes_the_choice():
    vocab = 12
    table = toy_table(vocab, -5.0)
    table[:, 7] = 1.0  # 7 again and again ...
    table[:, 8] = 0.8  # ... unless repeating the last choice is penalised
    prompt = torch.tensor([[2]])
    plain = GenerationSettings(num_beams=1, max_length=3, min_length=0)
    penalised = GenerationSettings(num_beams=1, max_length=3, min_length=0, repetition_penalty=2.0)
    assert generate(table_step(table), prompt, plain, EOS, PAD)[0].tolist() == [7, 7, 7]
    assert generate(table_step(table), prompt, penalised, EOS, PAD)[0].tolist() == [7, 8, 7]


def test_tiny_top_p_sampling_is_greedy():
    torch.manual_seed(3)
    table = torch.randn(10, 10) * 3
    table[:, PAD] = -1e4
    prompt = torch.tensor([[2], [5], [6]])
    greedy = GenerationSettings(num_beams=1, max_length=6, min_length=2, length_penalty=0.0)
    nucleus = GenerationSettings(sample=True, top_p=1e-6, max_length=6, min_length=2)
    sampled = nucleus_sample(table_step(table), prompt, nucleus, EOS, PAD, torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(table_step(table), prompt, greedy, EOS, PAD))


def test_settings_are_validated():
    with pytest.raises(ValueError, match="min_length"):
        GenerationSettings(min_length=5, max_length=3)
    with pytest.raises(ValueError, match="unknown generation keys"):
        GenerationSettings.from_config({"num_beam": 2})
    assert GenerationSettings.from_config({"num_beams": "2", "sample": False}).num_beams == 2


# ------------------------------------------------------------------------------- top_k, temperature, several sequences
def first_token_frequencies(table: torch.Tensor, settings: GenerationSettings, draws: int) -> torch.Tensor:
    """How often each token is drawn first after prompt token 2, over ``draws`` samples (num_return_sequences)."""
    settings = GenerationSettings(**{**settings.__dict__, "num_return_sequences": draws, "max_length": 1,
                                     "min_length": 1, "sample": True})
    tokens = generate(table_step(table), torch.tensor([[2]]), settings, EOS, PAD, torch.Generator().manual_seed(0))
    assert tokens.shape == (draws, 1)
    return torch.bincount(tokens[:, 0], minlength=table.shape[0]).float() / draws


def expected_first_token(table: torch.Tensor, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """softmax(logits / temperature) over the k likeliest tokens, the end token excluded (min_length 1)."""
    logits = table[2].clone()
    logits[EOS] = -float("inf")
    logits = logits / temperature
    if top_k:
        logits[logits < logits.topk(top_k).values[-1]] = -float("inf")
    return F.softmax(logits, dim=-1)


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.5, 0), (2.0, 0), (1.0, 3), (2.0, 3)])
def test_sampling_follows_temperature_and_top_k(temperature, top_k):
    torch.manual_seed(4)
    table = toy_table(8)
    table[2, 3:] = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0])  # next-token logits after prompt token 2
    settings = GenerationSettings(temperature=temperature, top_k=top_k, top_p=1.0)
    observed = first_token_frequencies(table, settings, draws=6000)
    expected = expected_first_token(table, temperature, top_k)
    torch.testing.assert_close(observed, expected, atol=0.025, rtol=0)
    if top_k:
        assert int((observed > 0).sum()) == top_k
    # The settings matter: the plain distribution is far from the tempered / truncated one.
    if (temperature, top_k) != (1.0, 0):
        assert (expected_first_token(table) - expected).abs().max() > 0.08


def test_top_k_one_and_cold_sampling_are_greedy():
    torch.manual_seed(3)
    table = torch.randn(10, 10) * 3
    table[:, PAD] = -1e4
    prompt = torch.tensor([[2], [5], [6]])
    greedy = generate(table_step(table), prompt, GenerationSettings(num_beams=1, max_length=6, min_length=2,
                                                                    length_penalty=0.0), EOS, PAD)
    for settings in (GenerationSettings(sample=True, top_k=1, top_p=1.0, max_length=6, min_length=2),
                     GenerationSettings(sample=True, temperature=1e-4, top_p=1.0, max_length=6, min_length=2)):
        sampled = nucleus_sample(table_step(table), prompt, settings, EOS, PAD, torch.Generator().manual_seed(0))
        assert torch.equal(sampled, greedy)


def test_beam_search_returns_the_n_best_sequences_in_order():
    torch.manual_seed(1)
    vocab, max_length, n = 6, 3, 4
    table = torch.randn(vocab, vocab) * 2
    table[:, PAD] = -1e4
    settings = GenerationSettings(num_beams=40, max_length=max_length, min_length=0, length_penalty=0.0,
                                  num_return_sequences=n)
    tokens, scores = beam_search(table_step(table), torch.tensor([[2], [4]]), settings, eos_id=EOS, pad_id=PAD)
    assert tokens.shape == (2 * n, max_length) and scores.shape == (2 * n,)
    log_probs = F.log_softmax(table, dim=-1)
    words = [t for t in range(vocab) if t not in (PAD, EOS)]
    for row, start in enumerate((2, 4)):
        ranked = []
        for length in range(max_length + 1):
            for body in itertools.product(words, repeat=length):
                path = (start, *body) if length == max_length else (start, *body, EOS)
                ranked.append((sum(log_probs[a, b].item() for a, b in itertools.pairwise(path)), list(body)))
        ranked.sort(key=lambda item: -item[0])
        for j in range(n):  # rows row * n + j: the j-th best sequence of prompt row
            got = [t for t in tokens[row * n + j].tolist() if t != PAD]
            assert got == ranked[j][1], (row, j)
            assert scores[row * n + j].item() == pytest.approx(ranked[j][0], abs=1e-4)


def test_several_samples_per_prompt_are_grouped_by_prompt():
    vocab = 12
    table = toy_table(vocab, -1e4)
    table[2, 5] = table[2, 6] = 0.0  # prompt 2 continues with 5 or 6 ...
    table[4, 7] = table[4, 8] = 0.0  # ... prompt 4 with 7 or 8
    table[5:9, EOS] = 0.0  # then ends
    settings = GenerationSettings(sample=True, top_p=1.0, max_length=3, min_length=0, num_return_sequences=8)
    tokens = generate(table_step(table), torch.tensor([[2], [4]]), settings, EOS, PAD,
                      torch.Generator().manual_seed(0))
    assert tokens.shape == (16, 3)
    assert set(tokens[:8, 0].tolist()) == {5, 6} and set(tokens[8:, 0].tolist()) == {7, 8}  # both drawn, in order


def test_model_generate_returns_n_captions_per_image(tmp_path):
    model = caption_model(tmp_path)
    image = torch.randn(3, 3, 32, 32)
    prompt = torch.tensor([SPECIAL.cls, 10, 11])
    one = GenerationSettings(num_beams=3, max_length=8, min_length=1)
    three = GenerationSettings(num_beams=3, max_length=8, min_length=1, num_return_sequences=3)
    with torch.no_grad():
        best = model.generate(image, prompt, one)
        all_beams = model.generate(image, prompt, three)
        sampled = model.generate(image, prompt, GenerationSettings(sample=True, max_length=8, num_return_sequences=2),
                                 generator=torch.Generator().manual_seed(0))
    assert best.shape == (3, 8) and all_beams.shape == (9, 8) and sampled.shape == (6, 8)
    assert torch.equal(all_beams[::3], best)  # the first of each image's three is its best beam
    assert all(len({tuple(row) for row in all_beams[3 * b:3 * b + 3].tolist()}) == 3 for b in range(3))


def test_new_settings_are_validated():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GenerationSettings(temperature=0.0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        GenerationSettings(top_k=-1)
    with pytest.raises(ValueError, match="num_return_sequences must be >= 1"):
        GenerationSettings(num_return_sequences=0)
    with pytest.raises(ValueError, match=r"num_return_sequences \(4\) must be <= num_beams \(3\)"):
        GenerationSettings(num_beams=3, num_return_sequences=4)
    assert GenerationSettings(sample=True, num_beams=1, num_return_sequences=4).rows_per_prompt == 4
    settings = GenerationSettings.from_config({"top_k": "50", "temperature": "0.7", "num_return_sequences": 2})
    assert (settings.top_k, settings.temperature, settings.num_return_sequences) == (50, 0.7, 2)
