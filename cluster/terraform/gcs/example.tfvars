project_id  = "my-project"
location    = "europe-west1"
bucket_name = "my-company-aiplatform"
prefix      = "aiplatform"
