"""The index job and its stages: corpus -> validate -> embed -> sink -> staging -> one commit to passages."""
