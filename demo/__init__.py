"""The Gradio demo: `python -m demo`; `demo.app.build_app` for the app itself."""
