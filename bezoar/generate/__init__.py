"""bezoar.generate"""
