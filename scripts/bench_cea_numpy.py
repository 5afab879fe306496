"""Reference numpy implementation of the PSA benchmarked by scripts/bench-cea.

The model is models/examples/hiv-briggs-2-5.toml (Chancellor et al. 1997 as in
Briggs et al. 2006, ex. 2.5/4.7): 4 states, 20 yearly cycles, 2 strategies,
Dirichlet transition rows, gamma costs, log-normal relative risk, combination
effect and lamivudine cost for the first two cycles, counting at the end of
each cycle, costs discounted 6% from the first cycle, life-years undiscounted.

Two implementations are timed:
  loop        one iteration at a time with numpy matrix products (the usual
              way a model is first written);
  vectorised  all iterations at once, cycles in a loop (the fastest numpy form).
Prints one JSON line. With a third argument "vectorised", only the vectorised
form is timed (loop_seconds is null).
"""
import json
import sys
import time

import numpy as np

N_CYCLES = 20
DR_COST = 0.06
C_ZIDO = 2278.0
C_LAMI = 2086.5
ALPHA_A = [1251, 350, 116, 17]
ALPHA_B = [731, 512, 15]
ALPHA_C = [1312, 437]
MEANLOG, SDLOG = -0.67530, 0.16972
COSTS = {"dmc_a": 1701, "dmc_b": 1774, "dmc_c": 6948, "ccc_a": 1055, "ccc_b": 1278, "ccc_c": 2059}


def sample(rng, n):
    s = {k: rng.gamma(1.0, v, n) for k, v in COSTS.items()}  # shape 1, scale = mean (sd = mean)
    s["rr"] = rng.lognormal(MEANLOG, SDLOG, n)
    s["pa"] = rng.dirichlet(ALPHA_A, n)
    s["pb"] = rng.dirichlet(ALPHA_B, n)
    s["pc"] = rng.dirichlet(ALPHA_C, n)
    return s


def matrix(pa, pb, pc, rr):
    m = np.zeros((4, 4))
    m[0, 1:] = pa[1:] * rr
    m[1, 2:] = pb[1:] * rr
    m[2, 3] = pc[1] * rr
    for i in range(3):
        m[i, i] = 1.0 - m[i].sum()
    m[3, 3] = 1.0
    return m


def run_loop(s, n):
    disc = 1.0 / (1.0 + DR_COST) ** np.arange(1, N_CYCLES + 1)
    out = np.zeros((n, 4))
    for i in range(n):
        state_cost = np.array([s["dmc_a"][i] + s["ccc_a"][i], s["dmc_b"][i] + s["ccc_b"][i], s["dmc_c"][i] + s["ccc_c"][i], 0.0])
        alive = np.array([1.0, 1.0, 1.0, 0.0])
        p_mono = matrix(s["pa"][i], s["pb"][i], s["pc"][i], 1.0)
        p_comb = matrix(s["pa"][i], s["pb"][i], s["pc"][i], s["rr"][i])
        for k, comb in enumerate((False, True)):
            x = np.array([1.0, 0.0, 0.0, 0.0])
            cost = 0.0
            ly = 0.0
            for t in range(1, N_CYCLES + 1):
                p = p_comb if comb and t <= 2 else p_mono
                x = x @ p
                drug = C_ZIDO + (C_LAMI if comb and t <= 2 else 0.0)
                cost += disc[t - 1] * (x @ (state_cost + drug * alive))
                ly += x @ alive
            out[i, 2 * k] = cost
            out[i, 2 * k + 1] = ly
    return out


def run_vectorised(s, n):
    disc = 1.0 / (1.0 + DR_COST) ** np.arange(1, N_CYCLES + 1)
    p_mono = np.zeros((n, 4, 4))
    p_mono[:, 0, 1:] = s["pa"][:, 1:]
    p_mono[:, 1, 2:] = s["pb"][:, 1:]
    p_mono[:, 2, 3] = s["pc"][:, 1]
    p_comb = p_mono * s["rr"][:, None, None]
    for p in (p_mono, p_comb):
        for i in range(3):
            p[:, i, i] = 1.0 - p[:, i, :].sum(axis=1)
        p[:, 3, 3] = 1.0
    state_cost = np.stack([s["dmc_a"] + s["ccc_a"], s["dmc_b"] + s["ccc_b"], s["dmc_c"] + s["ccc_c"], np.zeros(n)], axis=1)
    alive = np.array([1.0, 1.0, 1.0, 0.0])
    out = np.zeros((n, 4))
    for k, comb in enumerate((False, True)):
        x = np.zeros((n, 4))
        x[:, 0] = 1.0
        cost = np.zeros(n)
        ly = np.zeros(n)
        for t in range(1, N_CYCLES + 1):
            p = p_comb if comb and t <= 2 else p_mono
            x = np.einsum("ni,nij->nj", x, p)
            drug = C_ZIDO + (C_LAMI if comb and t <= 2 else 0.0)
            cost += disc[t - 1] * ((x * state_cost).sum(axis=1) + drug * (x @ alive))
            ly += x @ alive
        out[:, 2 * k] = cost
        out[:, 2 * k + 1] = ly
    return out


def best_of(fn, repeat, warm_up=0.5):
    # Warm up first (as the Rust side does): the first runs on a shared or
    # virtual machine also pay for waking the core and raising its clock.
    start = time.perf_counter()
    while time.perf_counter() - start < warm_up:
        fn()
    best = float("inf")
    result = None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    repeat = int(sys.argv[2]) if len(sys.argv) > 2 else 3

    def loop():
        rng = np.random.default_rng(2006)
        return run_loop(sample(rng, n), n)

    def vect():
        rng = np.random.default_rng(2006)
        return run_vectorised(sample(rng, n), n)

    t_vec, r_vec = best_of(vect, repeat)
    if len(sys.argv) > 3 and sys.argv[3] == "vectorised":
        t_loop = None
    else:
        # The loop takes seconds a run and varies little: two runs are enough.
        t_loop, r_loop = best_of(loop, min(2, repeat), warm_up=0)
        assert np.allclose(r_loop, r_vec), "the two numpy implementations disagree"
    print(json.dumps({
        "iterations": n,
        "numpy": np.__version__,
        "loop_seconds": t_loop,
        "vectorised_seconds": t_vec,
        "mean_cost": [float(r_vec[:, 0].mean()), float(r_vec[:, 2].mean())],
        "mean_effect": [float(r_vec[:, 1].mean()), float(r_vec[:, 3].mean())],
    }))


if __name__ == "__main__":
    main()
