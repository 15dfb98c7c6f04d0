"""Generated protobuf code for the Waymo ``Frame`` subset (see waymo_frame.proto, regenerate.sh)."""
