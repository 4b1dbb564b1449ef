"""bezoar.train"""
