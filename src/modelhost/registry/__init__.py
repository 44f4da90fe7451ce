"""Model lifecycles: the state machine, one owner task per model, and the registry of them."""
