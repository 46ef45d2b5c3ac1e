"""Control plane: membership, election, plan epochs as sans-IO state machines. Pure."""
