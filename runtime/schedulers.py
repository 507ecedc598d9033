"""Diffusion schedulers in numpy: Euler, Euler ancestral, LCM and DDIM, with diffusers' numbers.

A scheduler turns a step count into a ``Plan``: the timesteps the UNet sees and the update of each step.
Tables are computed in float32 the way diffusers computes them (float32 betas, cumulative product
accumulated in float64), so the same checkpoint config gives the same sigmas and timesteps.

A plan's per-step arithmetic uses only ``+ - * /`` between arrays and Python-float constants (and one
clip). The same code therefore runs on numpy arrays in the runtime and on torch tensors when the
export traces it into the fused graphs: the loop and the fused graphs share one definition.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import BadInputError

NAMES = ("euler", "euler_a", "lcm", "ddim")
# diffusers class name -> ours (a checkpoint's scheduler/scheduler_config.json names its class)
DIFFUSERS_NAMES = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "LCMScheduler": "lcm",
    "DDIMScheduler": "ddim",
}

_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
# diffusers' defaults per class: a key the checkpoint's config lacks takes the value that class would use.
DEFAULTS = {
    "euler": {
        **_COMMON,
        "timestep_spacing": "linspace",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
        "sigma_min": None,
        "sigma_max": None,
    },
    "euler_a": {**_COMMON, "timestep_spacing": "linspace"},
    "lcm": {
        **_COMMON,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
    },
    "ddim": {
        **_COMMON,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
        "timestep_spacing": "leading",
    },
}
# Settings this runtime does not implement: (key, the only supported value).
_ONLY = [
    ("rescale_betas_zero_snr", False),
    ("use_karras_sigmas", False),
    ("use_exponential_sigmas", False),
    ("use_beta_sigmas", False),
    ("timestep_type", "discrete"),
    ("final_sigmas_type", "zero"),
    ("interpolation_type", "linear"),
    ("thresholding", False),
]
F32 = np.float32


def scheduler_config(name: str, config: dict) -> dict:
    """The checkpoint's scheduler config as scheduler ``name`` sees it (diffusers' ``from_config``)."""
    if name not in DEFAULTS:
        raise BadInputError("scheduler", f"unknown scheduler {name!r}", f"choose one of {', '.join(NAMES)}")
    return {k: config.get(k, v) for k, v in DEFAULTS[name].items()}


def make_scheduler(name: str, config: dict) -> Scheduler:
    return {"euler": Euler, "euler_a": EulerAncestral, "lcm": LCM, "ddim": DDIM}[name](
        scheduler_config(name, config)
    )


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32), bit for bit: a float32 step, the first half counted
    from the start and the rest from the end, each with one rounding (a fused multiply-add; the float64
    product of a float32 and a small integer is exact, so float64 arithmetic then one cast gives the same)."""
    start, end = F32(start), F32(end)
    step = np.float64((end - start) / F32(n - 1))
    i = np.arange(n)
    return np.where(i < n // 2, np.float64(start) + step * i, np.float64(end) - step * (n - 1 - i)).astype(
        F32
    )


def alphas_cumprod(c: dict) -> np.ndarray:
    n = int(c["num_train_timesteps"])
    if c["trained_betas"] is not None:
        betas = np.asarray(c["trained_betas"], dtype=F32)
    elif c["beta_schedule"] == "linear":
        betas = _linspace_f32(c["beta_start"], c["beta_end"], n)
    elif c["beta_schedule"] == "scaled_linear":
        betas = _linspace_f32(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n) ** 2
    elif c["beta_schedule"] == "squaredcos_cap_v2":
        bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], dtype=F32)
    else:
        raise BadInputError(
            "scheduler config",
            f"unknown beta_schedule {c['beta_schedule']!r}",
            "supported: linear, scaled_linear, squaredcos_cap_v2, or trained_betas",
        )
    alphas = F32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(F32)  # torch accumulates a float32 cumprod in float64


def spaced_timesteps(c: dict, num_steps: int, integer: bool) -> np.ndarray:
    """The inference timesteps for ``timestep_spacing`` (Table 2 of arXiv:2305.08891), as diffusers spaces
    them."""
    n, spacing = int(c["num_train_timesteps"]), c["timestep_spacing"]
    if spacing == "linspace":
        t = np.linspace(0, n - 1, num_steps, dtype=np.float64 if integer else F32)[::-1]
        t = t.round() if integer else t
    elif spacing == "leading":
        t = (np.arange(0, num_steps) * (n // num_steps)).round()[::-1].astype(F32) + c["steps_offset"]
    elif spacing == "trailing":
        t = np.arange(n, 0, -n / num_steps).round().astype(F32) - 1
    else:
        raise BadInputError(
            "scheduler config",
            f"unknown timestep_spacing {spacing!r}",
            "supported: linspace, leading, trailing",
        )
    return np.ascontiguousarray(t).astype(np.int64 if integer else F32)


class Plan:
    """One call's schedule. ``timesteps[i]`` is fed to the UNet at step i; ``step`` updates the latents.

    ``begin`` > 0 starts part-way (image-to-image with strength < 1): the steps before it are skipped.
    """

    def __init__(self, timesteps: np.ndarray, begin: int = 0):
        self.all_timesteps = timesteps
        self.begin = begin

    @property
    def timesteps(self) -> np.ndarray:
        return self.all_timesteps[self.begin :].astype(F32)

    def __len__(self) -> int:
        return len(self.all_timesteps) - self.begin

    init_sigma = 1.0  # txt2img: the initial latents are unit noise times this

    def scale_input(self, i: int, x):
        return x

    def needs_noise(self, i: int) -> bool:
        """Does step i (counted from ``begin``) add fresh noise?"""
        return False

    def step(self, i: int, x, out, noise=None):
        raise NotImplementedError

    def add_noise(self, x0, noise):
        """Image-to-image: the encoded image noised to the level of the first step."""
        raise NotImplementedError


class Scheduler:
    name = ""

    def __init__(self, config: dict):
        for key, value in _ONLY:
            if key in config and config[key] != value:
                raise BadInputError(
                    "scheduler config",
                    f"{self.name}: {key}={config[key]!r} is not supported",
                    f"edgegen's schedulers support {key}={value!r}",
                )
        if config["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise BadInputError(
                "scheduler config",
                f"unknown prediction_type {config['prediction_type']!r}",
                "supported: epsilon, v_prediction, sample",
            )
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)

    def plan(self, num_steps: int, strength: float = 1.0) -> Plan:
        """The schedule for ``num_steps`` steps; ``strength`` < 1 skips the first steps as diffusers'
        image-to-image pipeline does (``int(num_steps * strength)`` steps run)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise BadInputError(
                "num_inference_steps", f"expected a positive integer, got {num_steps!r}", "use e.g. 1, 2 or 4"
            )
        if num_steps > self.config["num_train_timesteps"]:
            raise BadInputError(
                "num_inference_steps",
                f"{num_steps} exceeds the {self.config['num_train_timesteps']} training timesteps",
                "use fewer steps",
            )
        runs = min(int(num_steps * strength), num_steps)
        if runs < 1:
            raise BadInputError(
                "strength",
                f"{strength} x {num_steps} steps leaves no step to run",
                f"raise strength to at least {1 / num_steps:.3g} or use more steps",
            )
        return self._plan(int(num_steps), num_steps - runs)

    def _plan(self, num_steps: int, begin: int) -> Plan:
        raise NotImplementedError


# ---------------------------------------------------------------- Euler (k-diffusion style, sigma space)


class SigmaPlan(Plan):
    def __init__(self, timesteps, sigmas, prediction, init_sigma, begin):
        super().__init__(timesteps, begin)
        self.sigmas = sigmas  # float32, one more than the timesteps (the last is 0)
        self.prediction = prediction
        self.init_sigma = float(init_sigma)

    def _sigma(self, i):
        return self.sigmas[self.begin + i]

    def scale_input(self, i, x):
        return x / float((self._sigma(i) ** 2 + F32(1)) ** F32(0.5))

    def _derivative(self, i, x, out):
        sigma = self._sigma(i)
        s = float(sigma)
        if self.prediction == "epsilon":
            x0 = x - s * out
        elif self.prediction == "v_prediction":
            x0 = out * float(-sigma / (sigma**2 + F32(1)) ** F32(0.5)) + x / float(sigma**2 + F32(1))
        else:
            x0 = out
        return (x - x0) / s

    def add_noise(self, x0, noise):
        return x0 + noise * float(self._sigma(0))


class EulerPlan(SigmaPlan):
    def step(self, i, x, out, noise=None):
        dt = self.sigmas[self.begin + i + 1] - self._sigma(i)
        return x + self._derivative(i, x, out) * float(dt)


class AncestralPlan(SigmaPlan):
    def needs_noise(self, i):
        return self.sigmas[self.begin + i + 1] > 0  # the last step's noise is scaled by 0: not drawn

    def step(self, i, x, out, noise=None):
        s_from, s_to = self._sigma(i), self.sigmas[self.begin + i + 1]
        up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** F32(0.5)
        down = (s_to**2 - up**2) ** F32(0.5)
        x = x + self._derivative(i, x, out) * float(down - s_from)
        return x + noise * float(up) if self.needs_noise(i) else x


class Euler(Scheduler):
    name = "euler"
    plan_class = EulerPlan

    def tables(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) as diffusers' ``set_timesteps`` makes them."""
        t = spaced_timesteps(self.config, num_steps, integer=False)
        table = np.sqrt(
            (F32(1) - self.alphas_cumprod) / self.alphas_cumprod
        )  # correctly rounded; torch may differ by an ulp
        sigmas = np.interp(t, np.arange(len(table)), table)
        return t, np.concatenate([sigmas, [0.0]]).astype(F32)

    def _plan(self, num_steps, begin):
        t, sigmas = self.tables(num_steps)
        init = (
            sigmas.max()
            if self.config["timestep_spacing"] in ("linspace", "trailing")
            else (sigmas.max() ** 2 + 1) ** 0.5
        )
        return self.plan_class(t, sigmas, self.config["prediction_type"], F32(init), begin)


class EulerAncestral(Euler):
    name = "euler_a"
    plan_class = AncestralPlan

    def __init__(self, config):
        if config["prediction_type"] == "sample":
            raise BadInputError(
                "scheduler config",
                "euler_a: prediction_type 'sample' is not supported",
                "diffusers does not implement it either; use euler",
            )
        super().__init__(config)


# ---------------------------------------------------------------- DDIM and LCM (alpha space)


class AlphaPlan(Plan):
    def __init__(self, timesteps, alphas_cumprod, config, begin):
        super().__init__(timesteps, begin)
        self.ac = alphas_cumprod
        self.prediction = config["prediction_type"]
        self.clip = float(config["clip_sample_range"]) if config["clip_sample"] else None
        self.final = F32(1.0) if config["set_alpha_to_one"] else alphas_cumprod[0]

    def _t(self, i) -> int:
        return int(self.all_timesteps[self.begin + i])

    def _alpha(self, t: int):
        return self.ac[t] if t >= 0 else self.final

    def _x0_eps(self, t, x, out):
        """(predicted clean latents, predicted noise) from the model output."""
        a = self.ac[t]
        b = F32(1) - a
        if self.prediction == "epsilon":
            x0, eps = (x - float(b ** F32(0.5)) * out) / float(a ** F32(0.5)), out
        elif self.prediction == "v_prediction":
            x0 = float(a ** F32(0.5)) * x - float(b ** F32(0.5)) * out
            eps = float(a ** F32(0.5)) * out + float(b ** F32(0.5)) * x
        else:
            x0 = out
            eps = (x - float(a ** F32(0.5)) * x0) / float(b ** F32(0.5))
        if self.clip is not None:
            x0 = x0.clip(-self.clip, self.clip)  # numpy and torch both spell it .clip
        return x0, eps

    def add_noise(self, x0, noise):
        a = self.ac[self._t(0)]
        return float(a ** F32(0.5)) * x0 + float((F32(1) - a) ** F32(0.5)) * noise


class DDIMPlan(AlphaPlan):
    def __init__(self, timesteps, alphas_cumprod, config, begin, num_steps):
        super().__init__(timesteps, alphas_cumprod, config, begin)
        self.stride = (
            int(config["num_train_timesteps"]) // num_steps
        )  # diffusers steps back by this, not to the next entry

    def step(self, i, x, out, noise=None):  # eta = 0: deterministic
        t = self._t(i)
        prev = self._alpha(t - self.stride)
        x0, eps = self._x0_eps(t, x, out)
        return float(prev ** F32(0.5)) * x0 + float((F32(1) - prev) ** F32(0.5)) * eps


class LCMPlan(AlphaPlan):
    def __init__(self, timesteps, alphas_cumprod, config, begin):
        super().__init__(timesteps, alphas_cumprod, config, begin)
        self.scaling = F32(config["timestep_scaling"])

    def needs_noise(self, i):
        return self.begin + i != len(self.all_timesteps) - 1  # every step but the last re-noises

    def step(self, i, x, out, noise=None):
        t = self._t(i)
        k = self.begin + i + 1
        prev = self._alpha(int(self.all_timesteps[k]) if k < len(self.all_timesteps) else t)
        st = F32(t) * self.scaling
        c_skip = F32(0.25) / (st**2 + F32(0.25))  # sigma_data = 0.5
        c_out = st / (st**2 + F32(0.25)) ** F32(0.5)
        x0, _ = self._x0_eps(t, x, out)
        denoised = float(c_out) * x0 + float(c_skip) * x
        if not self.needs_noise(i):
            return denoised
        return float(prev ** F32(0.5)) * denoised + float((F32(1) - prev) ** F32(0.5)) * noise


class DDIM(Scheduler):
    name = "ddim"

    def tables(self, num_steps: int) -> np.ndarray:
        return spaced_timesteps(self.config, num_steps, integer=True)

    def _plan(self, num_steps, begin):
        return DDIMPlan(self.tables(num_steps), self.alphas_cumprod, self.config, begin, num_steps)


class LCM(Scheduler):
    name = "lcm"

    def tables(self, num_steps: int) -> np.ndarray:
        """LCM's schedule: evenly spaced picks from the distillation schedule of
        ``original_inference_steps``."""
        original = int(self.config["original_inference_steps"])
        if num_steps > original:
            raise BadInputError(
                "num_inference_steps",
                f"{num_steps} exceeds LCM's original_inference_steps {original}",
                f"use at most {original} steps",
            )
        k = int(self.config["num_train_timesteps"]) // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
        return origin[picks].astype(np.int64)

    def _plan(self, num_steps, begin):
        return LCMPlan(self.tables(num_steps), self.alphas_cumprod, self.config, begin)


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """LCM-distilled UNets (``time_cond_proj_dim``) take the guidance scale as a sinusoidal embedding of
    (guidance_scale - 1) * 1000, as diffusers' ``get_guidance_scale_embedding`` builds it."""
    w = np.asarray(w, dtype=F32) * F32(1000.0)
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=F32) * -(F32(np.log(F32(10000.0))) / F32(half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(F32)
