"""bezoar.eval"""
