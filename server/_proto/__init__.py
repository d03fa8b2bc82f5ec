"""Generated from proto/forgedit/v1/*.proto by scripts/gen_proto.sh. Do not edit."""
