"""The moderators' web page: a front end over ``bot.webaccess`` (and through it the same moderation services as
Discord's buttons), served by ``python -m bot web`` or, with WEB_PORT, by the bot process itself.

``app.create_app`` builds the aiohttp application (server-rendered Jinja2 templates, sessions in encrypted cookies,
a CSRF token on every form); ``pages`` holds the routes; ``cli`` the command line.
"""
