"""tts-workbench: diagnose and fix slow Chatterbox streaming."""
