"""Send one observation to a running `fastwam serve` and print the actions and timing.

    fastwam serve --checkpoint runs/small_cpu          # or: fastwam serve --fake
    python examples/client_example.py --host 127.0.0.1 --port 8000 [--wait 60]

A wrong host or port fails at once with one line saying so; `--wait S` keeps retrying for S seconds instead (a
server refuses connections until its checkpoint is loaded).

The observation is built from the server's own metadata (`observation_spec`): random uint8 images, a zero state
and a prompt, so the script works for any checkpoint. The unmodified openpi client works the same way:

    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    policy = WebsocketClientPolicy(host="127.0.0.1", port=8000)
    actions = policy.infer(obs)["actions"]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from fastwam.serving.client import ServerError, WebsocketClient
from fastwam.serving.protocol import example_observation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prompt", default="put the black bowl on the plate")
    parser.add_argument("--mode", default=None, help="fast / joint / idm (default: the server's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to keep retrying a refused connection")
    args = parser.parse_args()

    try:
        with WebsocketClient(args.host, args.port, connect_timeout_s=args.wait) as client:
            meta = client.metadata
            print(f"server: checkpoint={meta.get('checkpoint')} step={meta.get('checkpoint_step')} "
                  f"sha256={meta.get('checkpoint_sha256')} mode={meta.get('mode')}")
            print(f"action_shape: {meta.get('action_shape')}")
            print("observation_spec:", json.dumps(meta.get("observation_spec"), indent=None))

            obs = example_observation(meta, seed=args.seed, prompt=args.prompt)
            client.reset()  # the server calls policy.reset(); harmless for stateless policies
            reply = client.infer(obs, mode=args.mode)
    except ServerError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2

    actions = np.asarray(reply["actions"])
    np.set_printoptions(precision=4, suppress=True, linewidth=120)
    print(f"actions {actions.dtype} {list(actions.shape)}:")
    print(actions)
    for name in ("policy_timing", "server_timing"):
        print(f"{name}:", {k: v if isinstance(v, int) else round(float(v), 3) for k, v in reply.get(name, {}).items()})
    extra = sorted(set(reply) - {"actions", "policy_timing", "server_timing"})
    if extra:
        print("other reply keys:", extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
