"""The browser pages under /ui: sign-in, upload, jobs, review of a job, one image, export.

Server-rendered Jinja pages over the same store and engine as the JSON API (no second data
path), a little plain JavaScript, and every asset served from the package: screening sites
are often offline, so nothing may come from a CDN and nothing is built at install.
"""
