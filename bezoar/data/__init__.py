"""bezoar.data"""
