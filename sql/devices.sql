-- Users' push devices; a device that leaves the table is deleted in Customer.io.
-- kind: device
-- identifier: email
-- key: email
-- token: device_token
-- platform: platform
select
    u.email,
    d.device_token,
    d.platform,
    d.last_used,
    d.app_version
from demo.devices as d
join demo.users as u on u.user_id = d.user_id
where u.deleted_at is null
