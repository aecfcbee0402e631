"""The thin forwarding gateway (OpenAI-compatible proxy) behind the `gateway` receiver."""
