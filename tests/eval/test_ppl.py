import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import taille.models.lm as lm
from taille.errors import TailleError
from taille.eval.ppl import perplexity, windows
from taille.models.load import load_model
from tests.conftest import run_cli, save_tiny


@pytest.mark.parametrize("n,window,stride", [(100, 16, 16), (100, 16, 5), (17, 16, 16), (16, 16, 3), (2, 8, 8), (95, 10, 1)])
def test_tokens_are_scored_once_with_context(n, window, stride):
    scored = np.zeros(n, dtype=int)
    for begin, end, first in windows(n, window, stride):
        assert end - begin <= window and begin < first <= end
        scored[first:end] += 1
    assert scored[0] == 0 and scored.max() == 1
    if stride < window:  # overlapping windows: every token after the first is scored
        assert (scored[1:] == 1).all()
    else:  # disjoint windows: only each window's first token goes unscored
        assert (np.flatnonzero(scored == 0) == np.arange(0, n, window)).all()


def test_bad_window_arguments():
    with pytest.raises(TailleError, match="--stride"):
        windows(100, 8, 9)
    with pytest.raises(TailleError, match="at least 2 tokens"):
        windows(1, 8, 8)


def test_chunked_nll_matches_full_logits(tmp_path, family, monkeypatch):
    model, _ = load_model(str(save_tiny(tmp_path / family, family)))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        logits = model(ids).logits.float()  # transformers applies the family's soft cap itself
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    monkeypatch.setattr(lm, "LOGIT_ELEMENTS", model.config.vocab_size * 7)  # 7 tokens per slice
    torch.testing.assert_close(lm.token_nll(model, ids).reshape(-1), expected, rtol=1e-5, atol=1e-5)


def naive_perplexity(model, tokens, window, stride):
    """Independent reference: for every token t >= 1, its NLL given the context the window scheme
    grants it, computed one window at a time with the model's own loss."""
    total, count, scored_until = 0.0, 0, 1
    for begin in range(0, len(tokens) - 1, stride):
        end = min(begin + window, len(tokens))
        ids = torch.tensor(tokens[begin:end], dtype=torch.long)[None]
        labels = ids.clone()
        labels[0, : max(scored_until, begin + 1) - begin] = -100
        n = int((labels[0, 1:] != -100).sum())
        if n:
            with torch.no_grad():
                total += model(ids, labels=labels).loss.item() * n
            count += n
        scored_until = end
        if end == len(tokens):
            break
    return math.exp(total / count), count


@pytest.mark.parametrize("window,stride,batch", [(32, 32, 3), (32, 8, 4), (40, 40, 1)])
def test_perplexity_matches_a_naive_loop(tmp_path, window, stride, batch):
    model, _ = load_model(str(save_tiny(tmp_path / "m", "qwen2")))
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 203).astype(np.uint16)
    result = perplexity(model, tokens, window=window, stride=stride, batch_size=batch, progress=False)
    expected, count = naive_perplexity(model, tokens, window, stride)
    assert result.scored_tokens == count
    assert result.ppl == pytest.approx(expected, rel=1e-4)


def test_eval_cli_on_a_folder(tmp_path, capsys):
    path = save_tiny(tmp_path / "m", "llama")
    (tmp_path / "held.txt").write_text("when shall we three meet again in thunder " * 40)
    out, _ = run_cli(capsys, "eval", path, "--ppl", tmp_path / "held.txt", "--window", 64, "--json",
                     "--precision", "fp32")
    import json
    (row,) = json.loads(out)["rows"]
    (result,) = row["ppl"].values()
    assert result["window"] == 64 and result["stride"] == 64 and result["precision"] == "fp32"
    assert 1 < result["ppl"] < 2 * 320  # a random model is near uniform over its 320-token vocab


def test_eval_needs_something_to_measure(tmp_path, capsys):
    _, err = run_cli(capsys, "eval", save_tiny(tmp_path / "m"), code=2)
    assert "nothing to evaluate" in err and "--ppl" in err
