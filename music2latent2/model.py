"""The Music2Latent2 network: encoder, decoder and consistency model (paper section IV-2)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from .config import ModelConfig
from .edm import consistency_scalings
from .modules import NoiseEmbedding, TransformerBlock, set_upsample_mode, sinusoidal_positions
from .patchify import DePatchifier, Patchifier, set_channels_last
from .pretrained import PretrainedModule
from .spectral import ChunkGeometry, SpectralTransform

__all__ = ["Encoder", "Decoder", "ConsistencyModel", "Music2Latent2", "optimize_for_cpu"]


def _grid_to_tokens(h: torch.Tensor) -> torch.Tensor:
    return h.flatten(2).transpose(1, 2)  # (B, C, f, t) -> (B, f*t, C)


def _tokens_to_grid(tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    b, n, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1])  # (B, N, C) -> (B, C, f, t)


class Encoder(nn.Module):
    """Chunk -> K summary embeddings (TiTok): patchify, append K learned tokens, transform, keep them."""

    def __init__(self, spec_channels: int, channels: Sequence[int], layers: Sequence[int],
                 freq_down: Sequence[int], time_down: Sequence[int], freq_bins: int, norm_groups: int,
                 tokens_per_chunk: int, summary_tokens: int, latent_dim: int, dim: int, depth: int,
                 heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.patchifier = Patchifier(spec_channels, channels, layers, freq_down, time_down, freq_bins, norm_groups)
        self.token_in = nn.Linear(channels[-1], dim)
        self.audio_pos = nn.Parameter(sinusoidal_positions(tokens_per_chunk, dim) * 0.02)
        self.summary_tokens = nn.Parameter(torch.randn(summary_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.latent_out = nn.Linear(dim, latent_dim)

    def forward(self, spec: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            spec: (B, spec_channels, freq_bins, chunk_frames) one chunk per batch item.

        Returns:
            (latents (B, K, latent_dim) in (-1, 1), features (B, K, dim) before the last linear).
        """
        grid, _ = self.patchifier(spec)
        audio = self.token_in(_grid_to_tokens(grid)) + self.audio_pos  # (B, N, D)
        k = self.summary_tokens.shape[0]
        x = torch.cat([audio, self.summary_tokens.expand(audio.shape[0], -1, -1)], dim=1)  # (B, N+K, D)
        for block in self.blocks:
            x = block(x)
        features = self.norm(x[:, -k:])  # (B, K, D)
        return torch.tanh(self.latent_out(features)), features


class Decoder(nn.Module):
    """K summary embeddings -> features at every resolution level for the consistency model."""

    def __init__(self, channels: Sequence[int], layers: Sequence[int], freq_down: Sequence[int],
                 time_down: Sequence[int], freq_bins: int, norm_groups: int, token_grid: Tuple[int, int],
                 summary_tokens: int, latent_dim: int, dim: int, depth: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.token_grid = token_grid
        n_tokens = token_grid[0] * token_grid[1]
        self.latent_in = nn.Linear(latent_dim, dim)
        self.summary_pos = nn.Parameter(torch.randn(summary_tokens, dim) * 0.02)
        self.mask_tokens = nn.Parameter(sinusoidal_positions(n_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.token_out = nn.Linear(dim, channels[-1])
        self.depatchifier = DePatchifier(0, channels, layers, freq_down, time_down, freq_bins, norm_groups)

    def forward(self, latents: torch.Tensor) -> List[torch.Tensor]:
        """latents (B, K, latent_dim) -> per-level features [(B, channels[l], F_l, T_l)], fine first."""
        summary = self.latent_in(latents) + self.summary_pos  # (B, K, D)
        n = self.mask_tokens.shape[0]
        x = torch.cat([self.mask_tokens.expand(latents.shape[0], -1, -1), summary], dim=1)  # (B, N+K, D)
        for block in self.blocks:
            x = block(x)
        grid = _tokens_to_grid(self.token_out(self.norm(x[:, :n])), self.token_grid)
        _, feats = self.depatchifier(grid)
        return feats


class ConsistencyModel(nn.Module):
    """Denoises a window of one or two consecutive chunks with chunked causal attention.

    Everything but the transformer runs on each chunk independently with its own noise level;
    the transformer sees the tokens of the whole window, and chunk c attends only to chunks <= c.
    """

    def __init__(self, spec_channels: int, channels: Sequence[int], layers: Sequence[int],
                 freq_down: Sequence[int], time_down: Sequence[int], freq_bins: int, norm_groups: int,
                 token_grid: Tuple[int, int], dim: int, depth: int, heads: int, mlp_ratio: int,
                 noise_embed_dim: int, cond_dim: int, sigma_min: float, sigma_data: float,
                 max_window: int = 2) -> None:
        super().__init__()
        self.sigma_min, self.sigma_data = sigma_min, sigma_data
        self.token_grid = token_grid
        n_tokens = token_grid[0] * token_grid[1]
        self.noise_embed = NoiseEmbedding(noise_embed_dim, cond_dim)
        self.patchifier = Patchifier(spec_channels, channels, layers, freq_down, time_down, freq_bins,
                                     norm_groups, cond_dim)
        self.token_in = nn.Linear(channels[-1], dim)
        self.audio_pos = nn.Parameter(sinusoidal_positions(n_tokens, dim) * 0.02)
        self.window_pos = nn.Parameter(torch.randn(max_window, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, conditioned=True) for _ in range(depth))
        # One projection noise -> (6 block modulations + final shift/scale), shared by all blocks.
        ada_out = nn.Linear(cond_dim, 8 * dim)
        nn.init.zeros_(ada_out.weight)
        nn.init.zeros_(ada_out.bias)
        self.ada = nn.Sequential(nn.SiLU(), ada_out)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.token_out = nn.Linear(dim, channels[-1])
        self.depatchifier = DePatchifier(spec_channels, channels, layers, freq_down, time_down, freq_bins,
                                         norm_groups, cond_dim)

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor, cross: Sequence[torch.Tensor],
                last_only: bool = False) -> torch.Tensor:
        """
        Args:
            x_noisy: (B, W, C, F, T) noisy chunks, W = 1 or 2 consecutive chunks.
            sigma: (B, W) noise level of each chunk.
            cross: decoder features per level, each (B * W, C_l, F_l, T_l), chunk-major in W.
            last_only: return only the window's last chunk. Under chunked causal attention the
                last chunk's estimate never depends on the others' de-patchifier, so theirs is
                skipped: about a quarter of a two-chunk window's work, wasted wherever only the newest
                chunk is kept (low-latency streaming, all but the last denoising step, parallel
                decoding's second pass). Equal to ``forward(...)[:, -1:]`` up to float rounding.

        Returns:
            (B, W, C, F, T) consistency-model estimate of the clean chunks; (B, 1, C, F, T) with
            ``last_only``.
        """
        b, w = x_noisy.shape[:2]
        x = x_noisy.flatten(0, 1)  # (B*W, C, F, T)
        s = sigma.reshape(b * w).to(x.dtype)
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in consistency_scalings(s, self.sigma_data, self.sigma_min))
        cond = self.noise_embed(s)  # (B*W, cond)

        grid, skips = self.patchifier(x * c_in, cond, cross)
        tokens = self.token_in(_grid_to_tokens(grid)) + self.audio_pos  # (B*W, N, D)
        n, d = tokens.shape[1:]
        tokens = (tokens.view(b, w, n, d) + self.window_pos[:w, None]).reshape(b, w * n, d)  # (B, W*N, D)
        mod = self.ada(cond)  # (B*W, 8D): computed per chunk, broadcast to its tokens
        mod = mod.view(b, w, 1, -1).expand(b, w, n, mod.shape[-1]).reshape(b, w * n, -1)  # (B, W*N, 8D)
        block_mod, final_mod = mod.split([6 * d, 2 * d], dim=-1)
        for block in self.blocks:
            tokens = block(tokens, block_mod, causal_chunks=w)
        shift, scale = final_mod.chunk(2, dim=-1)
        tokens = self.norm(tokens) * (1 + scale) + shift  # (B, W*N, D)
        if last_only and w > 1:
            def last(t: torch.Tensor) -> torch.Tensor:  # (B*W, ...) -> (B, ...) rows of the last chunk
                return t.unflatten(0, (b, w))[:, -1]

            tokens = tokens.view(b, w, n, d)[:, -1]  # (B, N, D)
            x, cond, skips = last(x), last(cond), [last(s) for s in skips]
            c_skip, c_out = last(c_skip), last(c_out)
        w_out = 1 if last_only else w
        grid = _tokens_to_grid(self.token_out(tokens).reshape(b * w_out, n, -1), self.token_grid)
        out, _ = self.depatchifier(grid, cond, skips)
        denoised = c_skip * x + c_out * out.to(x.dtype)
        return denoised.view(b, w_out, *x_noisy.shape[2:])  # (B, W or 1, C, F, T)


class Music2Latent2(PretrainedModule):
    """The whole autoencoder. Build from a :class:`ModelConfig`, or load with :meth:`from_pretrained`
    (see :class:`~music2latent2.pretrained.PretrainedModule`); ``EncoderDecoder`` is the
    user-facing API that handles audio, padding, batching and latent scaling."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = config
        self.spectral = SpectralTransform(c.n_fft, c.hop_length, c.freq_bins, c.spec_alpha, c.spec_beta)
        self.geometry = ChunkGeometry.from_config(c)
        self.encoder = Encoder(c.spec_channels, c.channels, c.layers, c.freq_down, c.time_down, c.freq_bins,
                               c.norm_groups, tokens_per_chunk=c.tokens_per_chunk, summary_tokens=c.summary_tokens,
                               latent_dim=c.latent_dim, dim=c.dim, depth=c.depth, heads=c.heads, mlp_ratio=c.mlp_ratio)
        self.decoder = Decoder(c.channels, c.layers, c.freq_down, c.time_down, c.freq_bins, c.norm_groups,
                               token_grid=c.token_grid, summary_tokens=c.summary_tokens, latent_dim=c.latent_dim,
                               dim=c.dim, depth=c.depth, heads=c.heads, mlp_ratio=c.mlp_ratio)
        self.consistency = ConsistencyModel(c.spec_channels, c.channels, c.layers, c.freq_down, c.time_down,
                                            c.freq_bins, c.norm_groups, token_grid=c.token_grid, dim=c.dim,
                                            depth=c.depth, heads=c.heads, mlp_ratio=c.mlp_ratio,
                                            noise_embed_dim=c.noise_embed_dim, cond_dim=c.cond_dim,
                                            sigma_min=c.sigma_min, sigma_data=c.sigma_data)

    @torch.no_grad()
    def init_summary_tokens(self, std: float, generator: torch.Generator | None = None) -> None:
        """Re-draw the encoder's summary tokens and the decoder's summary positions as N(0, std^2).

        They are the only thing that tells the K slots apart. At a small scale next to the audio
        tokens the K slots start as near-copies (docs/recipe.md measures what that does).
        """
        for p in (self.encoder.summary_tokens, self.decoder.summary_pos):
            p.copy_(torch.randn(p.shape, generator=generator) * std)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode_chunks(self, spec: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, C, F, chunk_frames) -> (latents (N, K, d_lat) in (-1, 1), features (N, K, dim))."""
        return self.encoder(spec)

    def decoder_features(self, latents: torch.Tensor) -> List[torch.Tensor]:
        """(N, K, d_lat) unscaled latents -> per-level cross-connection features."""
        return self.decoder(latents)

    def denoise(self, x_noisy: torch.Tensor, sigma: torch.Tensor, cross: Sequence[torch.Tensor],
                last_only: bool = False) -> torch.Tensor:
        """One consistency-model evaluation; see :meth:`ConsistencyModel.forward`."""
        return self.consistency(x_noisy, sigma, cross, last_only)

    def extra_repr(self) -> str:
        return f"params={self.num_parameters() / 1e6:.1f}M"


def optimize_for_cpu(model: Music2Latent2, enabled: bool = True) -> Music2Latent2:
    """Lay ``model`` out for fast CPU inference, in place; the function it computes is unchanged.

    Upsampling becomes a strided transposed conv (``modules.Upsample``: the same function in
    2-2.25x fewer FLOPs there), and the conv weights and activations become channels-last
    (``patchify.set_channels_last``), where oneDNN's convolutions run up to 2.5x faster. Results
    differ from the default layout by float rounding only (the trained ``small``: 5e-6 in decoded
    audio, 1e-4 in latents); docs/streaming.md has the measured speed.
    :class:`~music2latent2.inference.EncoderDecoder` does this on a CPU; other devices keep the
    default layout until it is measured there. ``enabled=False`` restores the default layout
    (the one training uses).
    """
    set_upsample_mode(model, "transposed" if enabled else "pixel_shuffle")
    set_channels_last(model, enabled)
    layout = torch.channels_last if enabled else torch.contiguous_format
    for param in model.parameters():
        if param.dim() == 4:  # conv weights; the state dict is saved contiguous (checkpoint.py)
            param.data = param.data.contiguous(memory_format=layout)
    return model
