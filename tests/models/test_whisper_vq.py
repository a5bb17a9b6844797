"""Ichigo's WhisperVQ: the stage-1 contract (shapes, -1 padding, 50 frames/s decode), EMA training, the
mask code, the tiled initialisation and the merge of two code books at the documented indices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.quantizer import PAD_CODE, SemanticQuantizer
from models.whisper_vq import WhisperVQ, merge_codebooks, tile_codebook


def small(**kw) -> WhisperVQ:
    args = dict(dim=32, codebook_size=17, codebook_dim=8, window=40, heads=2, seed=0)
    args.update(kw)
    return WhisperVQ(**args)


def test_encode_keeps_frames_and_pads_with_minus_one_decode_doubles_them():
    torch.manual_seed(0)
    q = small().eval()
    assert isinstance(q, SemanticQuantizer) and (q.num_quantizers, q.codebook_size, q.dim) == (1, 17, 32)
    x = torch.randn(2, 10, 32)
    mask = torch.arange(10)[None, :] < torch.tensor([10, 6])[:, None]
    codes = q.encode(x, mask)
    assert codes.shape == (2, 1, 10) and codes.dtype == torch.long
    assert (codes[1, 0, 6:] == PAD_CODE).all() and (codes[mask[:, None]] >= 0).all()
    assert not (codes == q.mask_code).any()  # real frames never get the mask code
    states = q.decode(codes)
    assert states.shape == (2, 20, 32)  # 50 frames/s: two per code
    assert (states[1, 12:] == 0).all()  # padding decodes to zeros
    # A clip's states do not depend on its batch: the trimmed row alone decodes the same.
    torch.testing.assert_close(q.decode(codes[1:, :, :6])[0], states[1, :12])
    assert q.decode(codes[:, :, :0]).shape == (2, 0, 32)


def test_decode_splits_codes_longer_than_a_window():
    q = small(window=8).eval()
    codes = torch.randint(0, 16, (1, 1, 10))
    states = q.decode(codes)
    assert states.shape == (1, 20, 32)
    torch.testing.assert_close(states[:, 8:16], q.decode(codes[:, :, 4:8]))  # the second window, alone
    with pytest.raises(ValueError, match="outside the 17-code book"):
        q.decode(torch.full((1, 1, 3), 17))


def test_the_mask_code_is_never_chosen_even_when_it_is_nearest():
    q = small().eval()
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        q.codebook[q.mask_code] = q.project(x)[0, 0]
    assert q.encode(x)[0, 0, 0] != q.mask_code


def test_a_training_step_learns_the_book_by_ema_and_the_rest_by_gradient():
    torch.manual_seed(0)
    q = small(decay=0.5, dead_code_threshold=0.0).train()
    x = torch.randn(3, 12, 32)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2, 5:] = False
    book = q.codebook.clone()
    out = q(x, mask)
    assert out.codes.shape == (3, 1, 12) and (out.codes[2, 0, 5:] == PAD_CODE).all()
    assert out.states.shape == (3, 24, 32) and out.lengths.tolist() == [24, 24, 10]
    used = out.codes[out.codes >= 0].unique()
    moved = (q.codebook - book).norm(dim=-1) > 1e-6
    assert moved[used].all() and not moved[q.mask_code]  # EMA moved the used codes, never the mask
    torch.testing.assert_close(q.codebook.norm(dim=-1), torch.ones(17))  # cosine VQ: unit codes
    (out.states.square().mean() + out.commit_loss).backward()
    for name in ("mlp.0.weight", "project_in.weight", "project_out.weight", "blocks.0.linear1.weight", "positions.weight"):
        assert dict(q.named_parameters())[name].grad.abs().sum() > 0, name  # straight-through reaches the encoder side
    q.eval()
    book = q.codebook.clone()
    q(x, mask)
    torch.testing.assert_close(q.codebook, book)  # eval never updates the book


def test_dead_codes_restart_from_batch_frames_after_their_grace():
    torch.manual_seed(0)
    q = small(decay=0.5, dead_code_threshold=1.0, dead_code_grace=2).train()
    x = torch.randn(1, 6, 32)
    mask = torch.ones(1, 6, dtype=torch.bool)
    z = q.project(x).detach()[0]
    book = q.codebook.clone()
    used = torch.cat([q(x, mask).codes.flatten(), q(x, mask).codes.flatten()]).unique()
    idle = torch.ones(17, dtype=torch.bool)
    idle[used] = False
    assert idle.any()
    torch.testing.assert_close(q.codebook[idle], book[idle])  # within the grace: nothing restarted
    out = q(x, mask)  # fresh counts 4 -> 2 -> 1 -> 0.5: below the threshold now
    unused = torch.ones(17, dtype=torch.bool)
    unused[out.codes.flatten()] = False
    unused[q.mask_code] = False
    # Each code unused in that step was restarted from one of its frames (in the code space).
    cos = q.codebook[unused] @ z.t()
    assert unused.any() and torch.allclose(cos.max(dim=1).values, torch.ones(int(unused.sum())), atol=1e-5)


def test_tiled_codebook_repeats_the_source_with_small_noise():
    src = F.normalize(torch.randn(4, 8), dim=-1)
    tiled = tile_codebook(src, 10, noise=0.01, generator=torch.Generator().manual_seed(0))
    assert tiled.shape == (10, 8)
    torch.testing.assert_close(tiled.norm(dim=-1), torch.ones(10))
    cos = (tiled * src[torch.arange(10) % 4]).sum(-1)
    assert (cos > 0.99).all() and (tiled[0] - tiled[4]).abs().max() > 0  # copies, not identical ones
    q = small()
    q.init_codebook_from(src)
    assert ((q.codebook[:16] * src[torch.arange(16) % 4]).sum(-1) > 0.99).all()
    with pytest.raises(ValueError, match="4-dim"):
        q.init_codebook_from(torch.randn(3, 4))


def test_merge_puts_the_new_codes_and_mask_first_then_the_earlier_codes():
    """Ichigo's layout: 2048 new codes, the mask code at 2048, the 512 earlier codes at 2049..2560."""
    new = small(dim=8, codebook_size=2049, codebook_dim=4, seed=1)
    old = small(dim=8, codebook_size=513, codebook_dim=4, seed=2)
    merged, size = merge_codebooks(new.state_dict(), old.state_dict(), old_mask_code=old.mask_code, fresh_count=3.0)
    assert size == 2561
    q = small(dim=8, codebook_size=2561, mask_code=2048, codebook_dim=4)
    q.load_state_dict(merged)  # strict: every weight of the new quantizer, the book grown
    torch.testing.assert_close(q.codebook[:2049], new.codebook)
    torch.testing.assert_close(q.codebook[2049:], old.codebook[:512])
    torch.testing.assert_close(q.mlp[0].weight, new.mlp[0].weight)
    assert (q.cluster_size[2049:] == 3.0).all()
    # An input whose code-space vector is earlier code j is encoded as 2049 + j.
    with torch.no_grad():
        q.codebook[:2049] = -q.codebook[2049 + 7]  # every new code far from it
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        q.codebook[2049 + 7] = q.project(x)[0, 0]
    assert int(q.encode(x)[0, 0, 0]) == 2049 + 7


def test_merge_refuses_books_of_other_dimensions():
    with pytest.raises(ValueError, match="cannot merge a 4-dim code book with a 8-dim one"):
        merge_codebooks(small(codebook_dim=4).state_dict(), small(codebook_dim=8).state_dict(), old_mask_code=16)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="mask_code"):
        small(mask_code=17)
    with pytest.raises(ValueError, match="even number"):
        small(window=41)
