"""Wire: message types, msgpack codec, auth. Pure."""
