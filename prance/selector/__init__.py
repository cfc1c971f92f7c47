"""The PRANCE selector: a PPO policy over the stage MDP (Result-to-Go rewards) that picks
each input's sub-network widths and token keep per stage, and the per-input adaptive
execution it drives (docs/selector.md)."""
