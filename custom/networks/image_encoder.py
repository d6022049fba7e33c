"""The SAM-Med3D image encoder: a 3D ViT with decomposed relative position bias and a convolutional neck.

Shapes use ``g = image_size // patch_size`` (8 for the released configuration) and channels-last token
grids ``(B, D, H, W, C)`` inside the transformer.

The released weights were trained with "windowed" blocks that zero-pad the ``g^3`` grid to one
``window_size^3`` window and attend over all of it, padding included (reference §1). Every padded token
has the same key and value (the qkv bias), and the relative-position bias factorises per axis, so the
padded part of each softmax has a closed form: :meth:`Attention.forward_padded_window` attends over the
real tokens plus one aggregated key and gives the padded computation's result exactly, at a fraction of
its cost. ``fast_window_attention=False`` selects the literal padded computation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d, MLPBlock


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) pair along one axis.

    Args:
        q_size: number of query positions along the axis.
        k_size: number of key positions along the axis.
        rel_pos: table ``(L, C)``; linearly resampled when ``L != 2 * max(q_size, k_size) - 1``.

    Returns:
        ``(q_size, k_size, C)``: entry ``[i, j]`` is the table row for offset ``i - j`` (scaled when the
        two sizes differ).
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = F.interpolate(rel_pos.t()[None], size=max_rel_dist, mode="linear").squeeze(0).t()
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


class Attention(nn.Module):
    """Multi-head self-attention with decomposed 3D relative position bias.

    The bias added to the logit of query ``i`` and key ``j`` is
    ``q_i . (R_d[d_i - d_j] + R_h[h_i - h_j] + R_w[w_i - w_j])`` with the *unscaled* query.

    Args:
        dim: token width ``C``.
        num_heads: heads; ``C`` must be divisible by it.
        qkv_bias: whether the qkv projection has a bias.
        use_rel_pos: whether to add the relative position bias.
        rel_pos_size: side length ``K`` of the grid the tables were made for: tables are ``(2K - 1, C / heads)``.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = True, rel_pos_size: int = 8
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))

    def _split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, D, H, W, C)`` -> q, k, v each ``(B, heads, D*H*W, C / heads)``."""
        b = x.shape[0]
        qkv = self.qkv(x).reshape(b, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _axis_bias(self, q: torch.Tensor, q_grid: Sequence[int], k_grid: Sequence[int]) -> list[torch.Tensor]:
        """Per-axis bias terms ``(B, heads, Nq, k_axis)`` for depth, height and width.

        A query grid smaller than the key grid is its leading corner (the real tokens of a padded window).
        """
        b, h = q.shape[:2]
        r_q = q.reshape(b, h, *q_grid, self.head_dim)
        tables = (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w)
        rel = [get_rel_pos(ks, ks, t)[:qs].to(q.dtype) for qs, ks, t in zip(q_grid, k_grid, tables)]
        terms = (
            torch.einsum("bndhwc,dkc->bndhwk", r_q, rel[0]),
            torch.einsum("bndhwc,hkc->bndhwk", r_q, rel[1]),
            torch.einsum("bndhwc,wkc->bndhwk", r_q, rel[2]),
        )
        return [t.reshape(b, h, -1, t.shape[-1]) for t in terms]

    def _attend_with_bias(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        query_columns: Sequence[torch.Tensor],
        key_columns: torch.Tensor,
    ) -> torch.Tensor:
        """``softmax(scale * q.k + sum_c query_columns[c] * key_columns[c]) v`` without a bias matrix.

        The bias is a sum of per-axis terms, each a lookup by the key's coordinate on one axis: a product of
        the query's term and a one-hot of the key's coordinate. Appending those as extra channels of q and k
        lets fused attention compute it inside ``q.k``, instead of materialising ``(heads, Nq, Nk)`` biases.

        Args:
            q, k, v: ``(B, heads, N, C / heads)``.
            query_columns: ``(B, heads, Nq, n_c)`` blocks whose concatenation has one column per key column.
            key_columns: ``(Nk, sum n_c)`` per-key multipliers (one-hot coordinates, indicator columns).
        """
        scale = self.head_dim**-0.5
        b, h = q.shape[:2]
        q = torch.cat([q, *(c.to(q.dtype) / scale for c in query_columns)], dim=-1)
        k = torch.cat([k, key_columns.to(k.dtype).expand(b, h, -1, -1)], dim=-1)
        # The fused CPU kernels need v as wide as q; zero channels cost less than the unfused fallback.
        v = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
        return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., : self.head_dim]

    @staticmethod
    def _coordinate_one_hot(q: torch.Tensor, k_grid: Sequence[int]) -> torch.Tensor:
        """``(kd * kh * kw, kd + kh + kw)``: each key's depth, height and width coordinate, one-hot."""
        kd, kh, kw = k_grid
        eye = [torch.eye(s, dtype=q.dtype, device=q.device) for s in k_grid]
        return torch.cat(
            [
                eye[0][:, None, None, :].expand(kd, kh, kw, kd),
                eye[1][None, :, None, :].expand(kd, kh, kw, kh),
                eye[2][None, None, :, :].expand(kd, kh, kw, kw),
            ],
            dim=-1,
        ).reshape(kd * kh * kw, kd + kh + kw)

    def _merge_heads(self, out: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``(B, heads, N, C / heads)`` -> projected ``(B, D, H, W, C)``."""
        b = out.shape[0]
        out = out.transpose(1, 2).reshape(b, *grid, self.num_heads * self.head_dim)
        return self.proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global attention over the grid: ``(B, D, H, W, C)`` -> ``(B, D, H, W, C)``."""
        grid = x.shape[1:4]
        q, k, v = self._split_qkv(x)
        if self.use_rel_pos:
            out = self._attend_with_bias(q, k, v, self._axis_bias(q, grid, grid), self._coordinate_one_hot(q, grid))
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self._merge_heads(out, grid)

    def forward_padded_window(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """Exactly what zero-padding the grid to one ``window_size^3`` window and attending over it gives.

        Args:
            x: ``(B, D, H, W, C)`` with ``D, H, W <= window_size`` (already normalised by the block).
            window_size: side of the padded window.

        Returns:
            ``(B, D, H, W, C)``: the outputs of the real tokens.

        Padded tokens sit after the real ones on each axis; their key and value are the qkv bias. Their
        combined softmax weight for query ``i`` is ``exp(scale * q_i . b_k) * (prod_a S_a^all - prod_a S_a^real)``
        where ``S_a^all`` (``S_a^real``) sums ``exp(bias_a)`` over all (real) key positions of axis ``a``:
        one extra key with value ``b_v`` and that log-weight as its bias.
        """
        grid = tuple(x.shape[1:4])
        if any(s > window_size for s in grid):
            raise ValueError(f"grid {grid} does not fit in one window of {window_size}")
        if not self.use_rel_pos:
            raise ValueError("the closed form needs the relative position tables (use_rel_pos=True)")
        q, k, v = self._split_qkv(x)
        b = x.shape[0]
        axis_terms = self._axis_bias(q, grid, (window_size,) * 3)
        real_terms = [t[..., :s] for t, s in zip(axis_terms, grid)]
        real_keys = self._coordinate_one_hot(q, grid)
        if grid == (window_size,) * 3:
            return self._merge_heads(self._attend_with_bias(q, k, v, real_terms, real_keys), grid)
        terms32 = [t.float() for t in axis_terms]
        log_all = sum(t.logsumexp(-1) for t in terms32)
        log_real = sum(t[..., :s].logsumexp(-1) for t, s in zip(terms32, grid))
        log_padded = (log_all + torch.log(-torch.expm1(log_real - log_all)))[..., None]
        if self.qkv.bias is None:
            pad_kv = torch.zeros(2, self.num_heads, 1, self.head_dim, dtype=q.dtype, device=q.device)
        else:
            pad_kv = self.qkv.bias.reshape(3, self.num_heads, 1, self.head_dim)[1:].to(q.dtype)
        k = torch.cat([k, pad_kv[0].expand(b, -1, -1, -1)], dim=2)
        v = torch.cat([v, pad_kv[1].expand(b, -1, -1, -1)], dim=2)
        # The aggregated padding key carries only its log-weight (last column); real keys carry coordinates.
        key_columns = torch.zeros(real_keys.shape[0] + 1, real_keys.shape[1] + 1, dtype=q.dtype, device=q.device)
        key_columns[:-1, :-1] = real_keys
        key_columns[-1, -1] = 1
        out = self._attend_with_bias(q, k, v, [*real_terms, log_padded], key_columns)
        return self._merge_heads(out, grid)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad ``(B, D, H, W, C)`` to multiples of ``window_size`` and split it into windows.

    Returns:
        windows ``(B * nW, window_size, window_size, window_size, C)`` and the padded grid.
    """
    b, d, h, w, c = x.shape
    pads = [(window_size - s % window_size) % window_size for s in (d, h, w)]
    x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    dp, hp, wp = d + pads[0], h + pads[1], w + pads[2]
    ws = window_size
    x = x.view(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, c)
    return windows, (dp, hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_grid: Sequence[int], grid: Sequence[int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: windows -> ``(B, D, H, W, C)`` with the padding removed."""
    dp, hp, wp = padded_grid
    ws = window_size
    b = windows.shape[0] // ((dp // ws) * (hp // ws) * (wp // ws))
    x = windows.view(b, dp // ws, hp // ws, wp // ws, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, : grid[0], : grid[1], : grid[2]].contiguous()


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Args:
        window_size: 0 for global attention; otherwise the side of the (zero-padded) attention window.
        grid_size: side of the token grid the global rel-pos tables are made for.
        fast_window_attention: use the exact closed form for a grid that fits in one window.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 0,
        grid_size: int = 8,
        fast_window_attention: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim, num_heads, qkv_bias, use_rel_pos, rel_pos_size=window_size if window_size > 0 else grid_size
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=nn.GELU)
        self.window_size = window_size
        self.fast_window_attention = fast_window_attention

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        ws = self.window_size
        if ws == 0:
            return self.attn(x)
        grid = x.shape[1:4]
        if self.fast_window_attention and self.attn.use_rel_pos and all(s <= ws for s in grid):
            return self.attn.forward_padded_window(x, ws)
        windows, padded_grid = window_partition(x, ws)
        return window_unpartition(self.attn(windows), ws, padded_grid, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W, C)`` -> ``(B, D, H, W, C)``."""
        x = x + self._attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches -> channels-last tokens ``(B, D/p, H/p, W/p, C)``.

    The weights are those of a strided ``Conv3d`` (the checkpoint format), applied as one matrix product over
    the flattened patches: the same sums, and several times faster than CPU convolution under bf16 autocast.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(b, d // p, h // p, w // p, c * p**3)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class ImageEncoderViT3D(nn.Module):
    """3D ViT image encoder: ``(B, in_chans, D, H, W)`` -> embedding ``(B, out_chans, D/p, H/p, W/p)``.

    Args:
        img_size: side of the cubic input the absolute position embedding was made for (voxels).
        patch_size: side ``p`` of a patch (voxels); every input side must be a multiple of it.
        in_chans: input channels.
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP width / token width.
        out_chans: embedding channels after the neck.
        qkv_bias: bias in the qkv projections.
        use_abs_pos: learned absolute position embedding, trilinearly resampled for other input sizes.
        use_rel_pos: decomposed relative position bias.
        window_size: side of the padded attention window of non-global blocks (0: all blocks global).
        global_attn_indexes: blocks that attend over the whole grid.
        fast_window_attention: exact closed form for windowed blocks instead of the padded computation.
    """

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        fast_window_attention: bool = True,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim)) if use_abs_pos else None
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                grid_size=grid,
                fast_window_attention=fast_window_attention,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def set_fast_window_attention(self, enabled: bool) -> None:
        """Switch every windowed block between the exact closed form and the padded computation."""
        for block in self.blocks:
            block.fast_window_attention = enabled

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus absolute position: ``(B, in_chans, D, H, W)`` -> ``(B, D/p, H/p, W/p, C)``."""
        spatial = x.shape[2:]
        if x.ndim != 5 or any(s % self.patch_size for s in spatial):
            raise ValueError(
                f"expected an image (B, C, D, H, W) with sides that are multiples of {self.patch_size}, "
                f"got shape {tuple(x.shape)}"
            )
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:4] != x.shape[1:4]:
                pos = F.interpolate(
                    pos.permute(0, 4, 1, 2, 3), size=x.shape[1:4], mode="trilinear", align_corners=False
                ).permute(0, 2, 3, 4, 1)
            x = x + pos
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
